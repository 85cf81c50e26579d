"""Optimizer factory for the whole model (embedding table + dense network)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax


def make_optimizer(
    train_cfg, *, clip: bool = True, runtime_lr: bool = False
) -> optax.GradientTransformation:
    """Adam with FuxiCTR's gradient clipping (global norm 10) by default.

    `clip=False` leaves the clipping out: the sparse train step clips the dense gradients and the
    embedding row gradients together, by their joint global norm, before either optimizer.
    `runtime_lr=True`: the learning rate is a value in the optimizer state
    (`optax.inject_hyperparams`; `set_learning_rate` changes it), not a constant of the compiled
    step, so one compiled step serves every rate (the candidate protocol trains each model at
    several). The same arithmetic either way: the update is multiplied by -lr.
    """
    name = train_cfg.optimizer
    if name not in ("adam", "sgd"):
        raise ValueError(f"Unsupported optimizer: {name!r}; available: adam, sgd.")
    make = optax.adam if name == "adam" else optax.sgd
    if runtime_lr:
        # Only the rate in the state: Adam's b1, b2, eps stay Python constants, so the step's
        # arithmetic is the constant-rate step's (as arrays, 1 - b1 would round differently).
        static = tuple(n for n in inspect.signature(make).parameters if n != "learning_rate")
        make = optax.inject_hyperparams(make, static_args=static)
    tx = make(learning_rate=train_cfg.learning_rate)
    if clip and train_cfg.max_grad_norm and train_cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), tx)
    return tx


def _is_injected(x) -> bool:
    return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def set_learning_rate(opt_state, lr: float):
    """`opt_state` (a `runtime_lr` optimizer's, anywhere inside a tree) with its learning rate
    set to `lr`; the rest unchanged. Raises if it holds no such rate."""
    found = [0]

    def put(x):
        if not _is_injected(x):
            return x
        found[0] += 1
        old = x.hyperparams["learning_rate"]
        rate = jnp.asarray(lr, dtype=old.dtype)
        return x._replace(hyperparams={**x.hyperparams, "learning_rate": rate})

    out = jax.tree.map(put, opt_state, is_leaf=_is_injected)
    if not found[0]:
        raise ValueError("The optimizer state has no runtime learning rate (runtime_lr=False?).")
    return out
