"""Our Taobao-format stream: a generated `UserBehavior.csv` read by the real Taobao reader.

    python -m diet_jax.main --config=configs/taobao_synth.py --workdir=runs/taobao_synth
    python -m diet_jax.main --config=configs/taobao_synth.py:tiny --workdir=/tmp/taobao_synth
    python -m diet_jax.main --config=configs/taobao_synth.py --config.data.synth_rows=16000000 ...

`diet_jax/data/synthetic_taobao.py` writes the raw file into `data.data_dir` (once: a file with
the same generator parameters is reused), then `data/taobao.py` reads it as it reads the real
one: same stages (Beijing days 2017-11-25 .. 2017-12-03), fields, tasks (cart, fav, buy).
"""

import importlib.util
import os

import ml_collections


def _taobao_config(arg):
    """configs/taobao.py's get_config (configs/ is a folder of files, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "_taobao_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "taobao.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in ("default", "tiny"):
        raise ValueError(
            f"Unknown variant {variant!r} of configs/taobao_synth.py; use ':tiny' or nothing."
        )
    tiny = variant == "tiny"
    c = _taobao_config("tiny" if tiny else None)
    d = c.data
    d.source = "taobao_synth"
    d.data_dir = ""  # "" means <workdir>/raw (set by prepare); the generated file goes here
    d.seed = 0
    d.synth_rows = 1_000_000  # raw lines of UserBehavior.csv
    # Fixed vocabularies: more rows = more interactions of the same users and items, so model
    # size does not grow with the file (bench_scale.py measures the data path's scaling).
    d.synth_users = 50_000
    d.synth_items = 200_000
    d.synth_categories = 2_000
    d.synth_latent_dim = 8
    d.synth_zipf_exponent = 1.0
    d.synth_popularity_shift = 0.05  # per day: fraction of the item popularity ranking permuted
    d.synth_preference_drift = 0.05  # per day: AR(1) step of user tastes
    d.synth_taste_switch = 0.05  # per day: users who change favourite category
    d.synth_repeat_pv = 0.3  # interactions with a second pv line
    d.synth_outside_share = 0.0005  # lines outside every stage (the real file: 0.06%)
    d.synth_chunk_rows = 1 << 20  # interactions generated per chunk (bounds memory)
    if tiny:
        d.synth_rows = 40_000
        d.synth_users = 800
        d.synth_items = 2_000
        d.synth_categories = 50
        d.synth_chunk_rows = 4_096  # several chunks per day
        d.chunk_bytes = 64 << 10
        d.partition_bytes = 256 << 10
    return c
