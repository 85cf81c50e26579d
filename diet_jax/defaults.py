"""Defaults shared by every config file: model, teacher, training, distillation, evaluation.

A config file (configs/<dataset>.py) calls `base_config(tiny)` and then sets its `data` section
and whatever differs for its dataset. `tiny=True` shrinks everything for tests (seconds on CPU).
"""

import ml_collections


def base_config(tiny: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = not tiny  # progress bars on long loops
    # Size of the distilled / selected memory per stage: n_t = ratio * |D_t|.
    c.ratio = 0.05 if tiny else 0.015

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    c.model.name = "dcn"  # backbone of a candidate by default
    c.model.embed_dim = 8 if tiny else 32
    c.model.mmoe = ml_collections.ConfigDict()
    c.model.mmoe.num_experts = 2 if tiny else 4
    c.model.mmoe.expert_hidden = (16,) if tiny else (128,)
    c.model.mmoe.gate_hidden = ()
    c.model.mmoe.tower_hidden = (8,) if tiny else (64,)
    c.model.dcn = ml_collections.ConfigDict()
    c.model.dcn.num_cross_layers = 2 if tiny else 3
    c.model.dcn.hidden = (32, 16) if tiny else (256, 128)
    c.model.dcn.use_bn = False

    # ------------------------------------------------------------------ teacher
    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = "dcn"  # the reference model's backbone

    # ------------------------------------------------------------------ train
    c.train = ml_collections.ConfigDict()
    c.train.optimizer = "adam"
    c.train.learning_rate = 3e-3 if tiny else 1e-3
    c.train.max_grad_norm = 10.0
    c.train.batch_size = 256 if tiny else 1024
    c.train.eval_batch_size = 1024 if tiny else 8192
    c.train.log_every = 5 if tiny else 50
    # How the embedding table is updated (train/sparse.py): "dense_adam" (optax over every row),
    # "lazy_adam" or "rowwise_adagrad" (only the rows a batch touches). README: the evidence.
    c.train.embedding_optimizer = "dense_adam"
    c.train.adagrad_learning_rate = 0.01  # rowwise_adagrad's step size for the table

    # ------------------------------------------------------------------ distill
    # DIET distillation (phase 1 boundary memory, phase 2 bi-level refinement).
    c.distill = ml_collections.ConfigDict()

    # ------------------------------------------------------------------ evaluate
    # Candidate evaluation protocol, baselines, fidelity and report.
    c.evaluate = ml_collections.ConfigDict()
    return c
