"""A group of dense networks trained as one vmapped model on in-memory (embedding, logit) rows.

The G members of a group share one architecture; each has its own parameters, optimizer state,
learning rate, initialisation and row order (stacked on a leading G axis), and optionally its own
rows. One jitted call runs an epoch of every member: `jax.vmap` over members of a `lax.scan` over
batches, so a group of G small networks costs one dispatch per epoch instead of G x steps.

    fns = make_group_fns(model, batch_size, max_grad_norm, shared_rows=True)
    p_G, s_G, o_G, loss_G = fns.epoch(p_G, s_G, o_G, lr_G, e_NxFxD, logits_NxK, order_GxP)
    logits_GxVxK = fns.predict(p_G, s_G, e_VxFxD)

`vmapped=False` returns the same functions for one member (no G axis): the sequential reference
that tests compare the group against, and that `experiments/bench_models.py --vmapped` times.
The optimizer is Adam with global-norm clipping, written as clip -> scale_by_adam -> x(-lr) so the
learning rate can be a per-member array; it is `optax.chain(clip, optax.adam(lr))` exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diet_jax.models.factory import RecModel
from diet_jax.train.steps import bce_per_sample


class GroupFns(NamedTuple):
    tx: optax.GradientTransformation  # without the learning rate
    epoch: callable  # (p, s, o, lr, e, logits, order) -> (p, s, o, mean loss)
    predict: callable  # (p, s, e_VxFxD) -> logits_VxK, eval mode
    keep: callable  # (best, new, mask_G) -> where(mask, new, best), leafwise
    init_opt: callable  # jitted tx.init (one compile per architecture, not per leaf)


def rows_tx(max_grad_norm: float) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    return optax.chain(*parts, optax.scale_by_adam())


def padded_order(n: int, batch_size: int, rng: np.random.Generator, length: int = 0) -> np.ndarray:
    """A permutation of range(n) padded with -1 to a multiple of batch_size (and to `length`)."""
    order = rng.permutation(n).astype(np.int32)
    total = max(n + (-n) % batch_size, length + (-length) % batch_size)
    return np.concatenate([order, np.full(total - n, -1, np.int32)])


def make_group_fns(
    model: RecModel,
    batch_size: int,
    max_grad_norm: float,
    shared_rows: bool = True,
    vmapped: bool = True,
    predict_chunk: int = 4096,
) -> GroupFns:
    """The jitted epoch, predict and keep functions of a group (or of one member)."""
    # One member has no G axis to share rows over: the same functions either way, so one cache
    # entry (and one compilation per architecture) serves both.
    shared_rows = shared_rows or not vmapped
    return _group_fns(model, batch_size, max_grad_norm, shared_rows, vmapped, predict_chunk)


@functools.cache
def _group_fns(model, batch_size, max_grad_norm, shared_rows, vmapped, predict_chunk) -> GroupFns:
    tx = rows_tx(max_grad_norm)

    def loss_fn(p, s, e_BxFxD, t_BxK, w_B):
        logits, new_s, aux = model.dense(p, s, e_BxFxD, train=True)
        loss = jnp.sum(bce_per_sample(logits, t_BxK) * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)
        return loss + aux, (loss, new_s)

    def epoch1(p, s, o, lr, e_NxFxD, logits_NxK, order_P):
        def step(carry, idx_B):
            p, s, o = carry
            w_B = (idx_B >= 0).astype(jnp.float32)  # -1 pads the last batch
            real = jnp.any(idx_B >= 0)
            idx_B = jnp.maximum(idx_B, 0)
            t_BxK = jax.nn.sigmoid(logits_NxK[idx_B])  # soft targets
            grads, (loss, new_s) = jax.grad(loss_fn, has_aux=True)(p, s, e_NxFxD[idx_B], t_BxK, w_B)
            updates, new_o = tx.update(grads, o, p)
            updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
            new = (optax.apply_updates(p, updates), new_s, new_o)
            # A batch of padding only (rows padded to a common length) leaves the member as it
            # was, Adam's step count included, so padding never changes what a member learns.
            carry = jax.tree.map(lambda a, b: jnp.where(real, a, b), new, (p, s, o))
            return carry, jnp.where(real, loss, jnp.nan)

        (p, s, o), losses = jax.lax.scan(step, (p, s, o), order_P.reshape(-1, batch_size))
        return p, s, o, jnp.nanmean(losses)

    def predict1(p, s, e_VxFxD):
        v = e_VxFxD.shape[0]
        chunks = e_VxFxD.reshape(v // predict_chunk, predict_chunk, *e_VxFxD.shape[1:])
        out = jax.lax.map(lambda e: model.dense(p, s, e, train=False)[0], chunks)
        return out.reshape(v, -1)

    def keep(best, new, mask):
        def pick(b, n):
            m = mask.reshape(mask.shape + (1,) * (n.ndim - mask.ndim))
            return jnp.where(m, n, b)

        return jax.tree.map(pick, best, new)

    if vmapped:
        rows_axis = None if shared_rows else 0
        epoch = jax.vmap(epoch1, in_axes=(0, 0, 0, 0, rows_axis, rows_axis, 0))
        predict = jax.vmap(predict1, in_axes=(0, 0, None))
    else:
        epoch, predict = epoch1, predict1
    return GroupFns(tx, jax.jit(epoch), jax.jit(predict), jax.jit(keep), jax.jit(tx.init))


def pad_rows(e_VxFxD: np.ndarray, chunk: int) -> np.ndarray:
    """e padded with zero rows to a multiple of `chunk` (their predictions are dropped)."""
    pad = (-e_VxFxD.shape[0]) % chunk
    return np.concatenate([e_VxFxD, np.zeros((pad, *e_VxFxD.shape[1:]), e_VxFxD.dtype)])


# Jitted over the whole tree: op by op, every leaf shape of every new architecture would compile
# its own little stack / slice program (dozens per candidate).
@jax.jit
def _stack(*trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@jax.jit
def _unstack(tree, g):
    return jax.tree.map(lambda a: a[g], tree)


class Members:
    """The members of a group trained one after another, kept apart: `unstack` hands one back
    as it is. Stacking them only to slice one out again compiled a stack and a slice program per
    tree and group size of every architecture (about 3 s a candidate on the 2-core CPU)."""

    def __init__(self, trees: list):
        self.trees = list(trees)

    def __len__(self) -> int:
        return len(self.trees)


def stack(trees: list):
    """[tree, ...] -> one tree with a leading member axis."""
    return _stack(*trees)


def unstack(tree, g: int):
    """Member g of a stacked tree or of `Members`."""
    if isinstance(tree, Members):
        return tree.trees[g]
    return _unstack(tree, jnp.asarray(g, jnp.int32))


def stacked(tree):
    """A stacked tree, whether given stacked or as `Members` (comparisons, tests)."""
    return stack(tree.trees) if isinstance(tree, Members) else tree
