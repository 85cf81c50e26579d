"""DIET phase 1 (Algorithm 1): the boundary memory of stage t.

1. Score every row of D_t with EL2N under the stage teacher phi_t (in batches: bounded memory).
2. Group rows by label combination c in {0,1}^K; split the budget n_t = ratio x |D_t| across
   groups in a balanced way; in each group keep the rows whose score rank is nearest the
   percentile q ("upper-middle", default 0.9): informative but not the noisiest extremes.
3. Convert the kept rows to (e = Embed_phi_t(x), y~ = f_phi_t(e) logits).
4. For t > 1, retain the n_t rows of the previous memory with the largest influence on the newly
   selected samples, alpha_i = sum_{z in S_t} A(x_i, z) at phi_t (memory fusion).

`select_percentile` (no grouping) and `to_memory` are public: the EL2N, random and k-means
baselines select rows their own way and convert them with the same teacher.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diet_jax import influence
from diet_jax.data import loader
from diet_jax.data.store import Stage
from diet_jax.distill import memory as memory_lib
from diet_jax.distill.memory import Memory
from diet_jax.models.factory import RecModel

# ------------------------------------------------------------------ selection (host, numpy)


def budget(rows: int, ratio: float) -> int:
    """n_t = ratio x |D_t|, rounded, at least one row."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
    return max(1, min(rows, int(round(ratio * rows))))


def label_groups(y_NxK: np.ndarray) -> np.ndarray:
    """Label combination of every row as an integer code: sum_k y_k 2^k."""
    y = np.asarray(y_NxK).astype(np.int64)
    return y @ (np.int64(1) << np.arange(y.shape[1], dtype=np.int64))


def split_budget(sizes_G, n: int) -> np.ndarray:
    """Balanced split of n rows over groups of the given sizes (water-filling).

    Every group gets an equal share, capped by its size; what a small group cannot take is
    redistributed over the others. When the remainder does not divide evenly, the groups with
    the most rows still unselected get one more (ties: the earlier group).
    """
    sizes = np.asarray(sizes_G, np.int64)
    if n < 0 or np.any(sizes < 0):
        raise ValueError(f"Budget and group sizes must be non-negative, got {n} and {sizes}.")
    counts = np.zeros_like(sizes)
    remaining = min(int(n), int(sizes.sum()))
    while remaining > 0:
        open_g = np.flatnonzero(counts < sizes)
        share = remaining // open_g.size
        if share == 0:
            capacity = sizes[open_g] - counts[open_g]
            first = open_g[np.argsort(-capacity, kind="stable")[:remaining]]
            counts[first] += 1
            break
        add = np.minimum(share, sizes[open_g] - counts[open_g])
        counts[open_g] += add
        remaining -= int(add.sum())
    return counts


def select_percentile(scores_N, k: int, q: float) -> np.ndarray:
    """Indices (ascending) of the k rows whose score rank is nearest the q-quantile rank.

    Ranks are 0..n-1 by ascending score (ties: lower index first); the target rank is q (n-1);
    the k nearest ranks form a window centred on it, shifted inside [0, n) at the edges.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile must lie in [0, 1], got {q}.")
    scores = np.asarray(scores_N)
    n = scores.shape[0]
    if k <= 0:
        return np.zeros((0,), np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    start = math.floor(q * (n - 1) - (k - 1) / 2 + 0.5)
    start = min(max(start, 0), n - k)
    return np.sort(order[start : start + k])


def select_boundary(scores_N, y_NxK, n: int, q: float) -> np.ndarray:
    """Phase 1's selection S_t: per label group, the rows nearest percentile q; the budget n
    split across groups by `split_budget`. Returns row indices, ascending."""
    codes = label_groups(y_NxK)
    groups, inverse = np.unique(codes, return_inverse=True)
    counts = split_budget(np.bincount(inverse, minlength=groups.size), n)
    picked = []
    for g in range(groups.size):
        members = np.flatnonzero(inverse == g)
        picked.append(members[select_percentile(np.asarray(scores_N)[members], counts[g], q)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


def retain_top(alpha_N, n_keep: int) -> np.ndarray:
    """Indices (ascending) of the n_keep rows with the largest influence (ties: lower index)."""
    alpha = np.asarray(alpha_N)
    n_keep = min(max(int(n_keep), 0), alpha.shape[0])
    return np.sort(np.argsort(-alpha, kind="stable")[:n_keep])


# ------------------------------------------------------------------ teacher passes (jitted)


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_el2n(model: RecModel, params, model_state, x_BxF, y_BxK):
    logits_BxK = model.apply(params, model_state, x_BxF, train=False)[0]
    return logits_BxK, influence.el2n(logits_BxK, y_BxK)


@functools.partial(jax.jit, static_argnums=0)
def _embed_and_logits(model: RecModel, params, model_state, x_BxF):
    e_BxFxD = model.embed(params["embed"], x_BxF)
    return e_BxFxD, model.dense(params["dense"], model_state, e_BxFxD, train=False)[0]


def score_stage(
    model: RecModel, params, model_state, stage: Stage, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher logits [N, K] and EL2N scores [N] of every row, batch by batch (padded batches
    of one shape, so one compilation; memory bounded by the batch)."""
    logits, scores = [], []
    for batch in loader.device_batches(stage, batch_size, shuffle=False, drop_remainder=False):
        lg, sc = _logits_and_el2n(model, params, model_state, batch["x"], batch["y"])
        logits.append(lg)
        scores.append(sc)
    n = len(stage)
    return np.asarray(jnp.concatenate(logits))[:n], np.asarray(jnp.concatenate(scores))[:n]


def to_memory(
    model: RecModel,
    params,
    model_state,
    x_NxF,
    *,
    origin: int,
    rows_N=None,
    batch_size: int = 4096,
) -> Memory:
    """Rows -> (e = Embed_phi(x), y~ = f_phi(e) logits): the embedding-soft-label form (eq. 8).

    `params`/`model_state` are the stage teacher's; rows are processed in padded batches.
    """
    x = np.asarray(x_NxF, np.int32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("to_memory needs at least one row.")
    bs = min(batch_size, n)
    pad = -n % bs
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.int32)]) if pad else x
    es, lgs = [], []
    for i in range(0, x.shape[0], bs):
        e, lg = _embed_and_logits(model, params, model_state, jnp.asarray(x[i : i + bs]))
        es.append(e)
        lgs.append(lg)
    return memory_lib.new(jnp.concatenate(es)[:n], jnp.concatenate(lgs)[:n], origin, rows_N=rows_N)


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def retention_scores(model: RecModel, params_dense, model_state, old: Memory, targets, chunk_size):
    """alpha_i = sum_{z in targets} A((e_i, y~_i), z) for every row of the old memory (eq. 10).

    `targets` = {"e", "y"} (the newly selected samples with their labels), at `params_dense`.
    """
    loss_fn = influence.dense_loss(model, model_state)
    return influence.responsibility(
        loss_fn, loss_fn, params_dense, old.batch(), targets, chunk_size=chunk_size
    )


# ------------------------------------------------------------------ Algorithm 1


def boundary_memory(
    model: RecModel,
    teacher,
    stage: Stage,
    t: int,
    previous: Memory | None,
    *,
    ratio: float,
    percentile: float,
    fusion: bool = True,
    batch_size: int = 4096,
    chunk_size: int = 4096,
    retain: int | None = None,
) -> tuple[Memory, dict]:
    """D_syn^t before refinement. `teacher` is phi_t (a TrainState: .params, .model_state).
    `retain`: rows kept from `previous` (default n_t, the paper's rule).

    Returns the memory (new rows first, then retained rows) and a dict of counts for logging.
    """
    params, model_state = teacher.params, teacher.model_state
    _, scores = score_stage(model, params, model_state, stage, batch_size)
    y = np.asarray(stage.y_NxK)
    n_t = budget(len(stage), ratio)
    idx = select_boundary(scores, y, n_t, percentile)
    new = to_memory(
        model, params, model_state, stage.x_NxF[idx], origin=t, rows_N=idx, batch_size=batch_size
    )
    info = {"n_t": n_t, "selected": int(idx.size), "groups": int(np.unique(label_groups(y)).size)}
    if previous is None or not fusion or len(previous) == 0:
        info["retained"] = 0
        return new, info
    targets = {"e": new.e_NxFxD, "y": jnp.asarray(y[idx], jnp.float32)}
    alpha = retention_scores(
        model, params["dense"], model_state, previous, targets, chunk_size=chunk_size
    )
    keep = retain_top(np.asarray(alpha), n_t if retain is None else retain)
    info["retained"] = int(keep.size)
    return memory_lib.concat(new, memory_lib.take(previous, keep)), info
