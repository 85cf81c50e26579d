"""Selection baselines: which rows of a historical stage to keep, n = ratio x |D_t| of them.

Random and K-means live here; the EL2N-percentile baseline is DIET phase 1's own
`distill.phase1.select_percentile` over the whole stage (streamed:
`phase1.stage_selection(grouped=False)`). `kmeans_select` streams too: K-means fits on a bounded
subsample, then every row of the stage is assigned in chunks (two passes: cluster sizes, then
each cluster's nearest rows), holding one chunk and the n selected rows. Each returns sorted row indices; the
caller converts the rows to (embedding, teacher logits) pairs with the stage's teacher
(`distill.phase1.to_memory`), exactly as DIET's memory is built, so every method trains
candidates on the same kind of data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def random_rows(rows: int, n: int, seed: int) -> np.ndarray:
    """n distinct rows uniformly at random."""
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _assign(x_NxD, c_KxD, chunk: int):
    """Nearest centroid and squared distance of every row, computed in chunks of rows."""
    n = x_NxD.shape[0]
    pad = (-n) % chunk
    xp = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, x_NxD.shape[1])
    c_sq_K = jnp.sum(c_KxD**2, axis=1)

    def one(xc_CxD):
        d_CxK = jnp.sum(xc_CxD**2, axis=1, keepdims=True) - 2 * xc_CxD @ c_KxD.T + c_sq_K
        return jnp.argmin(d_CxK, axis=1), jnp.maximum(jnp.min(d_CxK, axis=1), 0.0)

    assign, dist = jax.lax.map(one, xp)
    return assign.reshape(-1)[:n], dist.reshape(-1)[:n]


def _kmeans_plus_plus(x_NxD, rng, k: int):
    keys = jax.random.split(rng, k)
    first = x_NxD[jax.random.randint(keys[0], (), 0, x_NxD.shape[0])]
    c_KxD = jnp.zeros((k, x_NxD.shape[1]), x_NxD.dtype).at[0].set(first)
    d_N = jnp.sum((x_NxD - first) ** 2, axis=1)

    def pick(i, carry):
        c_KxD, d_N = carry
        j = jax.random.choice(keys[i], x_NxD.shape[0], p=d_N / jnp.maximum(jnp.sum(d_N), 1e-30))
        c_KxD = c_KxD.at[i].set(x_NxD[j])
        return c_KxD, jnp.minimum(d_N, jnp.sum((x_NxD - x_NxD[j]) ** 2, axis=1))

    return jax.lax.fori_loop(1, k, pick, (c_KxD, d_N))[0]


@functools.partial(jax.jit, static_argnames=("k", "iters", "chunk"))
def kmeans(x_NxD: jax.Array, rng: jax.Array, *, k: int, iters: int = 20, chunk: int = 8192):
    """Lloyd's K-means in JAX. Returns (centroids_KxD, assign_N, sq_dist_N).

    Initial centroids by k-means++ (each next centroid drawn with probability proportional to
    its squared distance to the nearest chosen one); an empty cluster keeps its centroid.
    """
    n = x_NxD.shape[0]
    c0 = _kmeans_plus_plus(x_NxD, rng, k)

    def step(c_KxD, _):
        assign, _ = _assign(x_NxD, c_KxD, chunk)
        sums_KxD = jax.ops.segment_sum(x_NxD, assign, num_segments=k)
        counts_K = jax.ops.segment_sum(jnp.ones(n, x_NxD.dtype), assign, num_segments=k)
        new = jnp.where(counts_K[:, None] > 0, sums_KxD / jnp.maximum(counts_K, 1)[:, None], c_KxD)
        return new, None

    c, _ = jax.lax.scan(step, c0, None, length=iters)
    assign, dist = _assign(x_NxD, c, chunk)
    return c, assign, dist


def cluster_quotas(sizes_K: np.ndarray, n: int) -> np.ndarray:
    """n split over clusters in proportion to their sizes (largest remainder, capped by size)."""
    sizes_K = np.asarray(sizes_K, np.float64)
    exact = n * sizes_K / sizes_K.sum()
    quota = np.floor(exact).astype(np.int64)
    short = n - quota.sum()
    if short > 0:
        room = np.where(quota < sizes_K, exact - quota, -np.inf)
        quota[np.argsort(-room, kind="stable")[:short]] += 1
    return quota


def nearest_to_centroids(assign_N: np.ndarray, dist_N: np.ndarray, k: int, n: int) -> np.ndarray:
    """n rows: every cluster gets a quota proportional to its size (largest remainder), filled
    with its rows nearest the centroid. Returns sorted row indices."""
    assign_N, dist_N = np.asarray(assign_N), np.asarray(dist_N)
    quota = cluster_quotas(np.bincount(assign_N, minlength=k), n)
    order = np.lexsort((dist_N, assign_N))  # by cluster, then by distance
    sorted_assign = assign_N[order]
    first = np.searchsorted(sorted_assign, np.arange(k))
    rank_in_cluster = np.arange(order.size) - first[sorted_assign]
    return np.sort(order[rank_in_cluster < quota[sorted_assign]])


def kmeans_rows(rep_NxD: np.ndarray, n: int, *, k: int, iters: int, seed: int) -> np.ndarray:
    """n rows nearest the centroids of a K-means (K = min(k, n)) of the rows' representations."""
    k = max(1, min(k, n, rep_NxD.shape[0]))
    _, assign, dist = kmeans(jnp.asarray(rep_NxD), jax.random.key(seed), k=k, iters=iters)
    return nearest_to_centroids(np.asarray(assign), np.asarray(dist), k, n)


def _chunk_spans(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(n, lo + chunk)


def kmeans_select(
    rep_fn,
    rows: int,
    n: int,
    *,
    k: int,
    iters: int,
    seed: int,
    max_rows: int,
    chunk: int = 1 << 16,
    assign_chunk: int = 8192,
) -> np.ndarray:
    """`nearest_to_centroids` over every row of a stage, streamed.

    `rep_fn(idx)` gives the representations [len(idx), D] of rows `idx` (sorted). K-means fits
    on a seeded subsample of `max_rows` rows (all rows if fewer); then a pass over chunks counts
    cluster sizes (the quotas) and a second keeps each cluster's quota of nearest rows (ties: the
    lower row), merging a running buffer of at most n rows. Equals `kmeans_rows` when
    rows <= max_rows.
    """
    pool = np.arange(rows)
    if rows > max_rows:
        pool = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    k = max(1, min(k, n, pool.size))
    c_KxD, _, _ = kmeans(
        jnp.asarray(rep_fn(pool)), jax.random.key(seed), k=k, iters=iters, chunk=assign_chunk
    )
    # Whole inner chunks of `_assign`, aligned as in one pass over all rows: the same numbers.
    chunk = max(assign_chunk, chunk - chunk % assign_chunk)

    def assigned(lo, hi):
        rep = rep_fn(np.arange(lo, hi))
        if hi - lo < chunk:  # one shape for every chunk: one compilation
            rep = np.concatenate([rep, np.zeros((chunk - (hi - lo), rep.shape[1]), rep.dtype)])
        a, d = _assign(jnp.asarray(rep), c_KxD, assign_chunk)
        return np.asarray(a)[: hi - lo], np.asarray(d)[: hi - lo]

    sizes = np.zeros(k, np.int64)
    for lo, hi in _chunk_spans(rows, chunk):
        sizes += np.bincount(assigned(lo, hi)[0], minlength=k)
    quota = cluster_quotas(sizes, n)
    keep_idx = np.zeros(0, np.int64)
    keep_a = np.zeros(0, np.int64)
    keep_d = np.zeros(0, np.float32)
    for lo, hi in _chunk_spans(rows, chunk):
        a, d = assigned(lo, hi)
        idx = np.concatenate([keep_idx, np.arange(lo, hi)])
        a, d = np.concatenate([keep_a, a]), np.concatenate([keep_d, d])
        order = np.lexsort((idx, d, a))  # by cluster, distance, then row
        first = np.searchsorted(a[order], np.arange(k))
        rank = np.arange(order.size) - first[a[order]]
        sel = order[rank < quota[a[order]]]
        keep_idx, keep_a, keep_d = idx[sel], a[sel], d[sel]
    return np.sort(keep_idx)
