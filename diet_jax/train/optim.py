"""Optimizer factory for the whole model (embedding table + dense network)."""

from __future__ import annotations

import optax


def make_optimizer(train_cfg, *, clip: bool = True) -> optax.GradientTransformation:
    """Adam with FuxiCTR's gradient clipping (global norm 10) by default.

    `clip=False` leaves the clipping out: the sparse train step clips the dense gradients and the
    embedding row gradients together, by their joint global norm, before either optimizer.
    """
    name = train_cfg.optimizer
    if name == "adam":
        tx = optax.adam(train_cfg.learning_rate)
    elif name == "sgd":
        tx = optax.sgd(train_cfg.learning_rate)
    else:
        raise ValueError(f"Unsupported optimizer: {name!r}; available: adam, sgd.")
    if clip and train_cfg.max_grad_norm and train_cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), tx)
    return tx
