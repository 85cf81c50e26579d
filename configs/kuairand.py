"""KuaiRand-1K: 17 fields, 3 tasks (is_click, is_like, long_view), stages of appendix A.1.

    python -m diet_jax.main --config=configs/kuairand.py --workdir=runs/kuairand

The files of `KuaiRand-1K/data/` go in `data.data_dir` (see README, "Real datasets").
"""

import ml_collections

from diet_jax import config_check
from diet_jax.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_check.is_tiny(arg, "configs/kuairand.py")
    c = base_config(tiny)
    if not tiny:
        c.ratio = 0.015  # the paper's compression ratio for KuaiRand
        c.train.batch_size = 512  # the paper's batch size for KuaiRand

    c.data = ml_collections.ConfigDict()
    c.data.source = "kuairand"
    c.data.store_dir = ""  # where the stage store lives; "" means <workdir>/data
    c.data.data_dir = "data/raw/KuaiRand-1K/data"  # folder holding the logs and feature files
    # (name, role, first day, day after the last), by the logs' `date` column.
    c.data.stages = (
        ("stage_1", "historical", "2022-04-16", "2022-04-23"),
        ("stage_2", "historical", "2022-04-23", "2022-04-30"),
        ("subsequent", "subsequent", "2022-04-30", "2022-05-07"),
        ("validation", "validation", "2022-05-07", "2022-05-08"),
        ("test", "test", "2022-05-08", "2022-05-09"),
    )
    c.data.min_count = 1  # values seen fewer times in the historical stages map to OOV (id 0)
    c.data.chunk_bytes = 16 << 20  # raw text parsed per block (pass-1 memory: ~15x this)

    if tiny:
        c.data.data_dir = "data/raw/kuairand_tiny"
        c.data.chunk_bytes = 4096
    return c
