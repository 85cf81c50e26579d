"""The synthetic multi-task stream: the embedded default data, no download needed.

python -m diet_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
python -m diet_jax.main --config=configs/synthetic.py:tiny --workdir=/tmp/diet_tiny
python -m diet_jax.main --config=configs/synthetic.py --config.train.batch_size=2048 ...
"""

import ml_collections

from diet_jax import config_check
from diet_jax.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = config_check.is_tiny(arg, "configs/synthetic.py")
    c = base_config(tiny)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.store_dir = ""  # where the stage store lives; "" means <workdir>/data
    c.data.seed = 0
    c.data.field_names = ("user", "item", "category", "shop", "brand", "city", "age", "device")
    c.data.vocab_sizes = (20_000, 50_000, 1_000, 5_000, 2_000, 300, 8, 4)
    c.data.tasks = ("click", "like", "buy")
    c.data.positive_rates = (0.30, 0.05, 0.02)
    c.data.zipf_exponent = 1.05
    c.data.latent_dim = 8
    c.data.task_mix = 0.5  # weight of each task's private interaction matrix (0 = identical tasks)
    c.data.signal_scale = 1.5  # std of the true logit: sets the best achievable AUC
    c.data.num_historical_stages = 3
    c.data.stage_rows = 30_000
    c.data.subsequent_rows = 10_000
    c.data.validation_rows = 10_000
    c.data.test_rows = 10_000
    c.data.popularity_shift = 0.05  # fraction of each field's rank->id map permuted per stage
    c.data.preference_drift = 0.1  # AR(1) step of the latent preferences per stage
    c.data.interaction_drift = 0.3  # AR(1) step of the task interaction matrices per stage
    # What makes history matter (docs/configuration.md, "The synthetic stream"): a returning
    # cohort of tail ids, active in the historical stages, absent from the subsequent block,
    # back on the validation and test days with the preferences they had.
    c.data.history_fields = ("user", "item")  # fields that have a returning cohort
    c.data.history_cohort = 0.3  # fraction of each such field's tail ids in the cohort
    c.data.cohort_head = 200  # the most popular ranks never join the cohort
    c.data.cohort_return_share = 0.4  # share of val/test rows whose id comes from the cohort
    c.data.chunk_rows = 262_144  # generation chunk: bounds memory for any stream size

    if tiny:
        c.data.vocab_sizes = (200, 500, 50, 100, 40, 20, 8, 4)
        c.data.stage_rows = 6_000
        c.data.subsequent_rows = 3_000
        c.data.validation_rows = 3_000
        c.data.test_rows = 3_000
        c.data.cohort_head = 10
        c.data.chunk_rows = 2_500  # several chunks per stage, so chunking is exercised
    return c
