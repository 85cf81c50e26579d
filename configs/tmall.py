"""Tmall Repeat Buyers (IJCAI-15): 8 fields, 3 tasks, stages of the paper's appendix A.1.

    python -m diet_jax.main --config=configs/tmall.py --workdir=runs/tmall

`user_log_format1.csv` and `user_info_format1.csv` (from `data_format1 .zip`) go in
`data.data_dir` (see README, "Real datasets").
"""

import ml_collections

from diet_jax import config_check
from diet_jax.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_check.is_tiny(arg, "configs/tmall.py")
    c = base_config(tiny)
    if not tiny:
        c.ratio = 0.0139  # the paper's compression ratio for Tmall
        c.train.batch_size = 1024  # the paper's batch size for Tmall

    c.data = ml_collections.ConfigDict()
    c.data.source = "tmall"
    c.data.store_dir = ""  # where the stage store lives; "" means <workdir>/data
    c.data.data_dir = "data/raw/tmall"  # folder holding the data_format1 files
    c.data.year = 2014  # the files' mmdd dates carry no year; it only sets the weekday field
    # (name, role, first day, day after the last). The public log starts on 05/11, so stage_1
    # holds 05/11-05/31.
    c.data.stages = (
        ("stage_1", "historical", "2014-05-01", "2014-06-01"),
        ("stage_2", "historical", "2014-06-01", "2014-07-01"),
        ("stage_3", "historical", "2014-07-01", "2014-08-01"),
        ("subsequent", "subsequent", "2014-08-01", "2014-09-01"),
        ("validation", "validation", "2014-09-01", "2014-09-02"),
        ("test", "test", "2014-09-02", "2014-09-03"),
    )
    c.data.min_count = 1  # values seen fewer times in the historical stages map to OOV (id 0)
    c.data.chunk_bytes = 16 << 20  # raw text parsed per block (pass-1 memory: ~15x this)
    c.data.partition_bytes = 64 << 20  # raw text per user partition (group-by memory: ~7x this)

    if tiny:
        c.data.data_dir = "data/raw/tmall_tiny"
        c.data.chunk_bytes = 4096
        c.data.partition_bytes = 8192
    return c
