"""The synthetic multi-task stream: the embedded default data, no download needed.

python -m diet_jax.main --config=configs/synthetic.py --workdir=/tmp/diet
python -m diet_jax.main --config=configs/synthetic.py:tiny --workdir=/tmp/diet_tiny
python -m diet_jax.main --config=configs/synthetic.py --config.train.batch_size=2048 ...
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in ("default", "tiny"):
        raise ValueError(
            f"Unknown variant {variant!r} of configs/synthetic.py; use ':tiny' or nothing."
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True  # progress bars on long loops
    # Size of the distilled / selected memory per stage: n_t = ratio * |D_t|.
    c.ratio = 0.015

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.store_dir = ""  # where the stage store lives; "" means <workdir>/data
    c.data.data_dir = ""  # raw files (real datasets only)
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
    c.data.stage_rows = 200_000
    c.data.subsequent_rows = 100_000
    c.data.validation_rows = 50_000
    c.data.test_rows = 50_000
    c.data.popularity_shift = 0.05  # fraction of each field's rank->id map permuted per stage
    c.data.preference_drift = 0.1  # AR(1) step of the latent preferences per stage
    c.data.chunk_rows = 262_144  # generation chunk: bounds memory for any stream size

    c.model = ml_collections.ConfigDict()
    c.model.name = "dcn"  # backbone of a candidate by default
    c.model.embed_dim = 32
    c.model.mmoe = ml_collections.ConfigDict()
    c.model.mmoe.num_experts = 4
    c.model.mmoe.expert_hidden = (128,)
    c.model.mmoe.gate_hidden = ()
    c.model.mmoe.tower_hidden = (64,)
    c.model.dcn = ml_collections.ConfigDict()
    c.model.dcn.num_cross_layers = 3
    c.model.dcn.hidden = (256, 128)
    c.model.dcn.use_bn = False

    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = "dcn"  # the reference model's backbone

    c.train = ml_collections.ConfigDict()
    c.train.optimizer = "adam"
    c.train.learning_rate = 1e-3
    c.train.max_grad_norm = 10.0
    c.train.batch_size = 1024
    c.train.eval_batch_size = 8192
    c.train.log_every = 50

    # DIET distillation (phase 1 boundary memory, phase 2 bi-level refinement).
    c.distill = ml_collections.ConfigDict()

    # Candidate evaluation protocol, baselines, fidelity and report.
    c.evaluate = ml_collections.ConfigDict()

    if variant == "tiny":
        c.progress = False
        c.ratio = 0.05
        c.data.vocab_sizes = (200, 500, 50, 100, 40, 20, 8, 4)
        c.data.stage_rows = 6_000
        c.data.subsequent_rows = 3_000
        c.data.validation_rows = 3_000
        c.data.test_rows = 3_000
        c.data.chunk_rows = 2_500  # several chunks per stage, so chunking is exercised
        c.model.embed_dim = 8
        c.model.mmoe.num_experts = 2
        c.model.mmoe.expert_hidden = (16,)
        c.model.mmoe.tower_hidden = (8,)
        c.model.dcn.num_cross_layers = 2
        c.model.dcn.hidden = (32, 16)
        c.train.learning_rate = 3e-3
        c.train.batch_size = 256
        c.train.eval_batch_size = 1024
        c.train.log_every = 5
    return c
