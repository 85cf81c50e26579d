"""Taobao UserBehavior: 4 fields, 3 tasks (cart, fav, buy), stages of the paper's appendix A.1.

    python -m diet_jax.main --config=configs/taobao.py --workdir=runs/taobao
    python -m diet_jax.main --config=configs/taobao.py --config.data.data_dir=/data/taobao ...

The raw file `UserBehavior.csv` goes in `data.data_dir` (see README, "Real datasets").
"""

import ml_collections

from diet_jax import config_check
from diet_jax.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_check.is_tiny(arg, "configs/taobao.py")
    c = base_config(tiny)
    if not tiny:
        c.ratio = 0.0168  # the paper's compression ratio for Taobao
        c.train.batch_size = 4096  # the paper's batch size for Taobao

    c.data = ml_collections.ConfigDict()
    c.data.source = "taobao"
    c.data.store_dir = ""  # where the stage store lives; "" means <workdir>/data
    c.data.data_dir = "data/raw/taobao"  # folder holding UserBehavior.csv
    # (name, role, first day, day after the last), days in Beijing time (UTC+8).
    c.data.stages = (
        ("stage_1", "historical", "2017-11-25", "2017-11-27"),
        ("stage_2", "historical", "2017-11-27", "2017-11-29"),
        ("stage_3", "historical", "2017-11-29", "2017-12-01"),
        ("subsequent", "subsequent", "2017-12-01", "2017-12-02"),
        ("validation", "validation", "2017-12-02", "2017-12-03"),
        ("test", "test", "2017-12-03", "2017-12-04"),
    )
    c.data.utc_offset_hours = 8.0
    c.data.min_count = 1  # values seen fewer times in the historical stages map to OOV (id 0)
    c.data.chunk_bytes = 16 << 20  # raw text parsed per block (pass-1 memory: ~15x this)
    c.data.partition_bytes = 64 << 20  # raw text per user partition (group-by memory: ~7x this)

    if tiny:
        # Small files written by the tests; tiny blocks and partitions exercise the streaming.
        c.data.data_dir = "data/raw/taobao_tiny"
        c.data.chunk_bytes = 4096
        c.data.partition_bytes = 8192
    return c
