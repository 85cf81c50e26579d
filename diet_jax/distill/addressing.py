"""Bidirectional memory addressing (DIET section 4.2.1), on the fast jvp path.

Hard targets: the real samples of a minibatch with the smallest Deficiency(z) = sum over the
memory of A(x, z), the ones the memory serves worst. Active memory: the synthetic rows with the
largest Resp(x) = sum over the hard targets of A(x, z), the rows whose update can best lower the
loss on them. Each costs one batch gradient and one jvp (see `diet_jax.influence`). The plain
variants of the paper's ablation draw a random subset of the same size instead.

With both directions on, `address` runs the memory's forward pass once: the memory gradient of
the deficiency and the memory scores of the responsibility come from one linearization
(`influence.linearize_losses`), the same numbers as `hard_targets` then `active_memory`. (Jitted
together, those two get the same sharing from XLA's common-subexpression elimination: the same
FLOP count, 7.6 forward passes in all for B = N; the linearization makes it explicit.)

All functions are traceable; `diet_jax.distill.bilevel` calls them inside its jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diet_jax import influence


def hard_targets(
    loss_fn,
    params,
    real,
    syn,
    k: int,
    weights_B=None,
    syn_valid_N=None,
    *,
    chunk_size: int | None = None,
):
    """(indices [k] of the k real samples with the smallest deficiency, deficiency [B]).

    `real` and `syn` are {"e", "y"} batches; real rows with weight 0 (padding) are never
    picked; memory rows with `syn_valid_N` False (padding) do not count.
    """
    deficiency_B = influence.deficiency(
        loss_fn, loss_fn, params, real, syn, syn_valid_N, chunk_size=chunk_size
    )
    return _lowest(deficiency_B, k, weights_B), deficiency_B


def active_memory(
    loss_fn, params, syn, hard, k: int, syn_valid_N=None, *, chunk_size: int | None = None
):
    """(indices [k] of the k memory rows with the largest responsibility, responsibility [N]);
    rows with `syn_valid_N` False are never picked."""
    resp_N = influence.responsibility(loss_fn, loss_fn, params, syn, hard, chunk_size=chunk_size)
    return _highest(resp_N, k, syn_valid_N), resp_N


def _lowest(deficiency_B, k, weights_B=None):
    """Indices of the k smallest deficiencies among rows of positive weight."""
    ranked = deficiency_B if weights_B is None else jnp.where(weights_B > 0, deficiency_B, jnp.inf)
    return jax.lax.top_k(-ranked, k)[1]


def _highest(resp_N, k, syn_valid_N=None):
    """Indices of the k largest responsibilities among valid memory rows."""
    ranked = resp_N if syn_valid_N is None else jnp.where(syn_valid_N, resp_N, -jnp.inf)
    return jax.lax.top_k(ranked, k)[1]


def _address_shared(
    loss_fn, params, real, syn, hard_size, active_size, weights_B, syn_valid_N, chunk_size
):
    """Both directions on one linearization of the memory losses (one forward pass over it).

    The same values as `hard_targets` then `active_memory`: G_syn is the linearization's
    transpose applied to the validity weights, Resp its jvp in the direction G_hard.
    """
    _, syn_dots, syn_grad = influence.linearize_losses(loss_fn, params, syn)
    g_syn = syn_grad(syn_valid_N)
    deficiency_B = influence.grad_dot(loss_fn, params, real, g_syn, chunk_size=chunk_size)
    hard_idx = _lowest(deficiency_B, hard_size, weights_B)
    hard = jax.tree.map(lambda a: a[hard_idx], real)
    g_hard = influence.grad_sum(loss_fn, params, hard, chunk_size=chunk_size)
    resp_N = syn_dots(g_hard)
    return hard_idx, deficiency_B, _highest(resp_N, active_size, syn_valid_N), resp_N


def random_subset(key: jax.Array, n: int, k: int, valid_N=None) -> jax.Array:
    """k distinct indices of range(n) (of the valid ones), uniformly: the plain variant."""
    u_N = jax.random.uniform(key, (n,))
    if valid_N is not None:
        u_N = jnp.where(valid_N, u_N, -1.0)
    return jax.lax.top_k(u_N, k)[1]


def address(
    loss_fn,
    params,
    real,
    syn,
    *,
    hard_size: int,
    active_size: int,
    key: jax.Array,
    target_selection: bool = True,
    memory_selection: bool = True,
    syn_valid_N=None,
    chunk_size: int | None = None,
):
    """Both directions. Returns (hard_idx [hard_size], active_idx [active_size], stats).

    The influence is taken at `params` with `loss_fn` (see `influence.dense_loss`); `real` may
    carry weights "w" (0 for padding rows), the memory a validity mask `syn_valid_N` (a memory
    padded to a fixed capacity, so every stage shares one compiled step). Nothing here is
    differentiated.
    """
    real, syn, params = jax.lax.stop_gradient((real, syn, params))
    k_hard, k_active = jax.random.split(key)
    batch_real = {"e": real["e"], "y": real["y"]}
    b, n = real["y"].shape[0], syn["y"].shape[0]
    if not 0 < hard_size <= b or not 0 < active_size <= n:
        raise ValueError(
            f"hard_size must lie in [1, {b}] and active_size in [1, {n}], "
            f"got {hard_size} and {active_size}."
        )
    stats = {}
    if target_selection and memory_selection and (chunk_size is None or n <= chunk_size):
        # Both directions: the memory's forward pass is shared (bounded by chunk_size rows).
        hard_idx, deficiency_B, active_idx, resp_N = _address_shared(
            loss_fn,
            params,
            batch_real,
            syn,
            hard_size,
            active_size,
            real.get("w"),
            syn_valid_N,
            chunk_size,
        )
        valid = jnp.ones_like(resp_N) if syn_valid_N is None else syn_valid_N.astype(resp_N.dtype)
        stats["deficiency_mean"] = jnp.mean(deficiency_B)
        stats["deficiency_hard"] = jnp.mean(deficiency_B[hard_idx])
        stats["responsibility_mean"] = jnp.sum(resp_N * valid) / jnp.sum(valid)
        stats["responsibility_active"] = jnp.mean(resp_N[active_idx])
        return hard_idx, active_idx, stats
    if target_selection:
        hard_idx, deficiency_B = hard_targets(
            loss_fn,
            params,
            batch_real,
            syn,
            hard_size,
            real.get("w"),
            syn_valid_N,
            chunk_size=chunk_size,
        )
        stats["deficiency_mean"] = jnp.mean(deficiency_B)
        stats["deficiency_hard"] = jnp.mean(deficiency_B[hard_idx])
    else:
        w_B = real.get("w")
        hard_idx = random_subset(k_hard, b, hard_size, None if w_B is None else w_B > 0)
    hard = jax.tree.map(lambda a: a[hard_idx], batch_real)
    if memory_selection:
        active_idx, resp_N = active_memory(
            loss_fn, params, syn, hard, active_size, syn_valid_N, chunk_size=chunk_size
        )
        valid = jnp.ones_like(resp_N) if syn_valid_N is None else syn_valid_N.astype(resp_N.dtype)
        stats["responsibility_mean"] = jnp.sum(resp_N * valid) / jnp.sum(valid)
        stats["responsibility_active"] = jnp.mean(resp_N[active_idx])
    else:
        active_idx = random_subset(k_active, n, active_size, syn_valid_N)
    return hard_idx, active_idx, stats
