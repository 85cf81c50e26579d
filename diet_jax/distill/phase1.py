"""DIET phase 1 (Algorithm 1): the boundary memory of stage t.

1. Score every row of D_t with EL2N under the stage teacher phi_t (in batches: bounded memory).
2. Group rows by label combination c in {0,1}^K; split the budget n_t = ratio x |D_t| across
   groups (`group_budget`: balanced, or in proportion to their sizes); in each group keep the
   rows whose score rank is nearest the percentile q (the paper's 0.9, "upper-middle"; the
   config's default 0.5), or, with `strata` > 1, rows spread evenly over the score ranks
   (`rank_windows`).
3. Convert the kept rows to (e = Embed_phi_t(x), y~ = f_phi_t(e) logits).
4. For t > 1, retain the n_t rows of the previous memory with the largest influence on the newly
   selected samples, alpha_i = sum_{z in S_t} A(x_i, z) at phi_t (memory fusion).
   Before that (`reanchor`), the carried rows are moved into phi_t's embedding space and
   relabelled by phi_t: without it a row of stage 1 keeps phi_1's embedding and phi_1's soft
   label forever, while every candidate trains under phi_T's table (docs/distillation.md,
   "Re-anchoring").

`select_percentile` (no grouping) and `to_memory` are public: the EL2N, random and k-means
baselines select rows their own way and convert them with the same teacher.

Streaming (issue 13): `boundary_memory` and the EL2N baseline never hold a stage's rows or its
scores in host memory. `score_to_memmap` writes the EL2N scores batch by batch to a scratch
memmap; `select_boundary_chunked` then finds the same rows as `select_boundary` in a few passes
over chunks of (scores, labels): per-group counts, a radix select (one byte of the sortable
score key per pass) of the window's first and last ranks, and a last pass that keeps the rows
between them (ties by row index, as the in-memory sort). Memory: one chunk plus the selection.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from diet_jax import influence
from diet_jax.baselines import cluster_quotas
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


GROUP_SPLITS = ("balanced", "proportional")


def group_budget(sizes_G, n: int, split: str = "balanced") -> np.ndarray:
    """n rows over label groups: "balanced" (`split_budget`, equal shares: rare label
    combinations are over-represented) or "proportional" (shares by group size, largest
    remainder: the stage's label distribution is kept)."""
    if split == "balanced":
        return split_budget(sizes_G, n)
    if split == "proportional":
        sizes = np.asarray(sizes_G, np.int64)
        return cluster_quotas(sizes, min(int(n), int(sizes.sum())))
    raise ValueError(f"config.distill.group_split must be one of {GROUP_SPLITS}, got {split!r}.")


def select_percentile(
    scores_N, k: int, q: float, strata: int = 1, pick_seed: int | None = None, code: int = 0
) -> np.ndarray:
    """Indices (ascending) of the k rows whose score rank is nearest the q-quantile rank.

    Ranks are 0..n-1 by ascending score (ties: lower index first); the target rank is q (n-1);
    the k nearest ranks form a window centred on it, shifted inside [0, n) at the edges.
    With `strata` S > 1 (or 0: one per row) the rows come from S windows instead
    (`rank_windows`): the middle of each of S equal rank ranges, so the selection spans every
    score level (q is not used); `pick_seed`: a random place in each range (`pick_rng` of
    `code`, the label group's) instead of its middle.
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
    windows = rank_windows(n, k, q, strata, pick_rng(pick_seed, code))
    return np.sort(np.concatenate([order[a:b] for a, b in windows]))


def select_boundary(
    scores_N,
    y_NxK,
    n: int,
    q: float,
    split: str = "balanced",
    strata: int = 1,
    pick_seed: int | None = None,
) -> np.ndarray:
    """Phase 1's selection S_t: per label group, the rows nearest percentile q (or spread over
    `strata` score levels); the budget n split across groups by `group_budget`. Returns row
    indices, ascending."""
    codes = label_groups(y_NxK)
    groups, inverse = np.unique(codes, return_inverse=True)
    counts = group_budget(np.bincount(inverse, minlength=groups.size), n, split)
    picked = []
    for g in range(groups.size):
        members = np.flatnonzero(inverse == g)
        scores_g = np.asarray(scores_N)[members]
        rows = select_percentile(scores_g, counts[g], q, strata, pick_seed, int(groups[g]))
        picked.append(members[rows])
    return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


def window_start(n: int, k: int, q: float) -> int:
    """First rank of the k-row window centred on rank q (n - 1), shifted inside [0, n)."""
    start = math.floor(q * (n - 1) - (k - 1) / 2 + 0.5)
    return min(max(start, 0), n - k)


def pick_rng(pick_seed: int | None, code: int) -> np.random.Generator | None:
    """The generator of a label group's random stratified pick (`distill.strata_pick` =
    "random"), seeded by (pick_seed, group code) so that every path that selects the group (in
    memory or in chunks) draws the same rows; None (the middle of each range) without a seed."""
    return None if pick_seed is None else np.random.default_rng([int(pick_seed), int(code)])


def rank_windows(
    n: int, k: int, q: float, strata: int = 1, rng: np.random.Generator | None = None
) -> list[tuple[int, int]]:
    """The rank windows [start, end) that hold the k rows picked from n ranked rows.

    strata = 1: one window centred on rank q (n - 1) (`window_start`). strata = S > 1: the
    ranks split into S' = min(S, k) contiguous ranges of near-equal size, k split over them in
    proportion to their sizes (largest remainder, so no range is asked for more than it holds),
    and each range's rows taken from its middle: a sample spread evenly over the score levels.
    strata = 0 (or any S >= k): one range per row kept, i.e. one row every n / k ranks, a
    sample stratified by score. Windows are disjoint and ascending. With `rng` (strata != 1)
    each range's rows sit at a random place in it instead of its middle: a stratified random
    sample, which differs from seed to seed.
    """
    if strata < 0:
        raise ValueError(f"strata must be 0 (one per row kept) or positive, got {strata}.")
    k = min(int(k), int(n))
    if k <= 0:
        return []
    if strata == 1 or k == n:
        start = window_start(n, k, q)  # 0 when k == n
        return [(start, start + k)]
    s = k if strata == 0 else min(int(strata), k)
    edges = [(i * n) // s for i in range(s + 1)]
    sizes = np.diff(np.asarray(edges, np.int64))
    takes = cluster_quotas(sizes, k)
    out = []
    for lo, size, take in zip(edges[:-1], sizes.tolist(), takes.tolist(), strict=True):
        if take > 0:
            if rng is None:
                a = lo + window_start(size, int(take), 0.5)
            else:
                a = lo + int(rng.integers(size - int(take) + 1))
            out.append((a, a + int(take)))
    return out


def _sort_key(scores) -> np.ndarray:
    """uint32 keys in the order of the float32 scores (-0 folded into +0; no NaN expected)."""
    bits = (np.asarray(scores, np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(n, lo + chunk)


def _radix_select(scores_N, codes_fn, targets, n: int, chunk: int):
    """For each (code, rank) in `targets`: (key value at that rank, rows of the code below it).

    Four passes, one byte of the key each, most significant first; a pass histograms, per
    target, the next byte of the keys that share the prefix found so far.
    """
    prefix = np.zeros(len(targets), np.uint64)
    below = np.zeros(len(targets), np.int64)
    rank = np.array([r for _, r in targets], np.int64)
    for level in range(4):
        shift = np.uint32(24 - 8 * level)
        hist = np.zeros((len(targets), 256), np.int64)
        for lo, hi in _chunks(n, chunk):
            key = _sort_key(scores_N[lo:hi])
            codes = codes_fn(lo, hi)
            byte = (key >> shift) & np.uint32(255)
            high = key.astype(np.uint64) >> np.uint64(shift + 8) if level else None
            for j, (code, _) in enumerate(targets):
                m = codes == code
                if level:
                    m &= high == prefix[j]
                hist[j] += np.bincount(byte[m], minlength=256)
        for j in range(len(targets)):
            cum = np.cumsum(hist[j])
            b = int(np.searchsorted(cum, rank[j] - below[j], side="right"))
            below[j] += int(cum[b - 1]) if b > 0 else 0
            prefix[j] = (prefix[j] << np.uint64(8)) | np.uint64(b)
    return prefix.astype(np.uint32), below


def select_windows_chunked(
    scores_N,
    codes_fn,
    groups,
    counts,
    q: float,
    n: int,
    chunk: int,
    strata: int = 1,
    pick_seed: int | None = None,
):
    """Per group code: the counts[g] rows (by ascending (score, row)) of `rank_windows` (one
    window nearest rank q (n_g - 1), or `strata` windows spread over the ranks).

    `codes_fn(lo, hi)` gives the group code of rows lo..hi-1; `groups` = (code, n_g) pairs.
    Returns sorted row indices; host memory is one chunk plus the selection. Time grows with
    the number of windows (two radix targets each).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile must lie in [0, 1], got {q}.")
    plan = []  # (code, start, end) rank windows, end exclusive
    for (code, size), k in zip(groups, counts, strict=True):
        windows = rank_windows(size, int(k), q, strata, pick_rng(pick_seed, code))
        plan += [(code, a, b) for a, b in windows]
    if not plan:
        return np.zeros((0,), np.int64)
    targets = [t for code, a, b in plan for t in ((code, a), (code, b - 1))]
    value, below = _radix_select(scores_N, codes_fn, targets, n, chunk)
    picked = []
    seen_lo = np.zeros(len(plan), np.int64)  # ties already met at the window's first value
    seen_hi = np.zeros(len(plan), np.int64)
    for lo, hi in _chunks(n, chunk):
        key = _sort_key(scores_N[lo:hi])
        codes = codes_fn(lo, hi)
        for j, (code, start, end) in enumerate(plan):
            v_lo, v_hi = value[2 * j], value[2 * j + 1]
            b_lo, b_hi = below[2 * j], below[2 * j + 1]
            m = codes == code
            keep = m & (key > v_lo) & (key < v_hi)
            # Ties at an edge value are ranked by row: the i-th tie has rank below + i.
            tie_lo = m & (key == v_lo)
            r_lo = b_lo + seen_lo[j] + np.cumsum(tie_lo) - 1
            keep |= tie_lo & (r_lo >= start) & (r_lo < end)
            seen_lo[j] += int(tie_lo.sum())
            if v_hi != v_lo:
                tie_hi = m & (key == v_hi)
                r_hi = b_hi + seen_hi[j] + np.cumsum(tie_hi) - 1
                keep |= tie_hi & (r_hi < end)
                seen_hi[j] += int(tie_hi.sum())
            picked.append(lo + np.flatnonzero(keep))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def select_percentile_chunked(
    scores_N,
    k: int,
    q: float,
    chunk: int = 1 << 20,
    strata: int = 1,
    pick_seed: int | None = None,
) -> np.ndarray:
    """`select_percentile` over a memmap of scores, one chunk at a time."""
    n = int(scores_N.shape[0])
    if k <= 0:
        return np.zeros((0,), np.int64)
    return select_windows_chunked(
        scores_N,
        lambda lo, hi: np.zeros(hi - lo, np.int64),
        [(0, n)],
        [k],
        q,
        n,
        chunk,
        strata,
        pick_seed,
    )


def group_sizes_chunked(y_NxK, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(sorted label codes present, their row counts), one chunk of labels at a time."""
    k = y_NxK.shape[1]
    counts = np.zeros(1 << k, np.int64)
    for lo, hi in _chunks(int(y_NxK.shape[0]), chunk):
        counts += np.bincount(label_groups(y_NxK[lo:hi]), minlength=1 << k)
    present = np.flatnonzero(counts)
    return present, counts[present]


def select_boundary_chunked(
    scores_N,
    y_NxK,
    n: int,
    q: float,
    chunk: int = 1 << 20,
    split: str = "balanced",
    strata: int = 1,
    pick_seed: int | None = None,
):
    """`select_boundary` (the same rows) over memmaps of scores and labels, in chunks."""
    rows = int(scores_N.shape[0])
    codes, sizes = group_sizes_chunked(y_NxK, chunk)
    budget_G = group_budget(sizes, n, split)
    return select_windows_chunked(
        scores_N,
        lambda lo, hi: label_groups(y_NxK[lo:hi]),
        list(zip(codes.tolist(), sizes.tolist(), strict=True)),
        budget_G.tolist(),
        q,
        rows,
        chunk,
        strata,
        pick_seed,
    )


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


@functools.partial(jax.jit, static_argnums=0)
def _el2n(model: RecModel, params, model_state, x_BxF, y_BxK):
    logits_BxK = model.apply(params, model_state, x_BxF, train=False)[0]
    return influence.el2n(logits_BxK, y_BxK)


def score_to_memmap(
    model: RecModel, params, model_state, stage: Stage, batch_size: int, path: str
) -> np.ndarray:
    """EL2N score of every row written batch by batch to a float32 memmap at `path` (.npy).

    The same scores as `score_stage`; host memory: the batches in flight.
    """
    n = len(stage)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n,))
    pending, start = None, 0

    def flush(item):
        lo, scores = item
        hi = min(n, lo + scores.shape[0])
        out[lo:hi] = np.asarray(scores)[: hi - lo]

    for batch in loader.device_batches(stage, batch_size, shuffle=False, drop_remainder=False):
        sc = _el2n(model, params, model_state, batch["x"], batch["y"])
        if pending is not None:  # copy the previous batch while this one computes
            flush(pending)
        pending, start = (start, sc), start + batch_size
    if pending is not None:
        flush(pending)
    out.flush()
    return out


class ScratchDir:
    """A temporary folder (for score memmaps), removed on exit; under `root` if given."""

    def __init__(self, root: str | None = None):
        self.root = root

    def __enter__(self) -> str:
        if self.root:
            os.makedirs(self.root, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="diet-scores-", dir=self.root or None)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def stage_selection(
    model: RecModel,
    teacher,
    stage: Stage,
    n: int,
    q: float,
    *,
    grouped: bool,
    batch_size: int = 4096,
    chunk: int = 1 << 20,
    scratch: str | None = None,
    split: str = "balanced",
    strata: int = 1,
    pick_seed: int | None = None,
) -> np.ndarray:
    """EL2N rows of a stage under `teacher`, streamed: grouped (phase 1, label groups' budgets by
    `group_budget(split)`) or not (EL2N baseline); `strata`, `pick_seed`: see `rank_windows`,
    `pick_rng`."""
    with ScratchDir(scratch) as d:
        scores = score_to_memmap(
            model,
            teacher.params,
            teacher.model_state,
            stage,
            batch_size,
            os.path.join(d, "el2n.npy"),
        )
        if grouped:
            idx = select_boundary_chunked(
                scores, stage.y_NxK, n, q, chunk, split, strata, pick_seed
            )
        else:
            idx = select_percentile_chunked(scores, n, q, chunk, strata, pick_seed)
        del scores
    return idx


def embed_rows(model: RecModel, params, model_state, x_NxF, batch_size: int = 4096):
    """(e = Embed_phi(x) [N, F, D], y~ = f_phi(e) logits [N, K]) as host arrays.

    Padded batches of one shape (one compilation), each written into the preallocated outputs
    as it comes back: the host holds the result once, not a list of batches and their
    concatenation (three copies of a memory that grows with the stream).
    """
    x = np.asarray(x_NxF, np.int32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("embed_rows (to_memory, reanchor) needs at least one row.")
    bs = min(batch_size, n)
    e_out = lg_out = None
    for i in range(0, n, bs):
        xb = x[i : i + bs]
        m = xb.shape[0]
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, x.shape[1]), np.int32)])
        e, lg = _embed_and_logits(model, params, model_state, jnp.asarray(xb))
        if e_out is None:
            e_out = np.empty((n, *e.shape[1:]), e.dtype)
            lg_out = np.empty((n, *lg.shape[1:]), lg.dtype)
        e_out[i : i + m] = np.asarray(e)[:m]
        lg_out[i : i + m] = np.asarray(lg)[:m]
    return e_out, lg_out


def mix_labels(logits_NxK, y_NxK, mix: float) -> np.ndarray:
    """Soft labels pulled toward the rows' hard labels: logit((1 - mix) sigmoid(y~) + mix y).

    mix = 0 returns the teacher's logits unchanged (the paper's eq. 8); mix -> 1 gives the
    hard labels. Why: a weak teacher's predictions carry little of what separates positives
    from negatives (docs/distillation.md, "Hard labels in the soft ones").
    """
    logits = np.asarray(logits_NxK, np.float32)
    if not 0 <= mix < 1:
        raise ValueError(f"The label mix must lie in [0, 1), got {mix}.")
    if mix == 0:
        return logits
    p = (1 - mix) / (1 + np.exp(-logits.astype(np.float64))) + mix * np.asarray(y_NxK)
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


def to_memory(
    model: RecModel,
    params,
    model_state,
    x_NxF,
    *,
    origin: int,
    rows_N=None,
    batch_size: int = 4096,
    y_NxK=None,
    label_mix: float = 0.0,
) -> Memory:
    """Rows -> (e = Embed_phi(x), y~ = f_phi(e) logits): the embedding-soft-label form (eq. 8).

    `params`/`model_state` are the stage teacher's; rows are processed in padded batches.
    `label_mix` > 0 pulls the soft labels toward the rows' hard labels `y_NxK` (`mix_labels`).
    """
    e, logits = embed_rows(model, params, model_state, x_NxF, batch_size)
    if label_mix:
        if y_NxK is None:
            raise ValueError("A label mix needs the rows' hard labels (y_NxK).")
        logits = mix_labels(logits, y_NxK, label_mix)
    return memory_lib.new(e, logits, origin, rows_N=rows_N)


REANCHOR = ("off", "replace", "offsets")


def reanchor(
    model: RecModel,
    teacher,
    previous_teacher,
    memory: Memory,
    rows_of,
    mode: str = "replace",
    batch_size: int = 4096,
) -> Memory:
    """The carried memory moved from phi_{t-1}'s space to phi_t's (`teacher`: phi_t).

    A row that knows where it came from (row_N >= 0) gets e = Embed_phi_t(x) and
    y~ = f_phi_t(e): "replace" drops what refinement added to it, "offsets" keeps it
    (e += e_old - Embed_phi_{t-1}(x), y~ += y~_old - f_phi_{t-1}(Embed_phi_{t-1}(x)); needs
    `previous_teacher`). Rows with row_N = -1 stay as they are. `rows_of(origin, rows_N)`
    returns the raw x_NxF of those rows of stage `origin` (1-based). "off": unchanged.
    """
    if mode not in REANCHOR:
        raise ValueError(f"config.distill.reanchor must be one of {REANCHOR}, got {mode!r}.")
    if mode == "off" or len(memory) == 0:
        return memory
    e = np.array(memory.e_NxFxD)  # updated in place, chunk by chunk
    logits = np.array(memory.logits_NxK)
    origin_N, row_N = np.asarray(memory.origin_N), np.asarray(memory.row_N)
    # Chunks of rows, so that the re-embedded rows (and phi_{t-1}'s, for "offsets") exist for
    # one chunk at a time, not for the whole carried memory.
    chunk = 8 * batch_size
    for origin in np.unique(origin_N[row_N >= 0]):
        sel_all = np.flatnonzero((origin_N == origin) & (row_N >= 0))
        bs = min(batch_size, sel_all.size)  # one batch shape for every chunk of this origin
        for j in range(0, sel_all.size, chunk):
            sel = sel_all[j : j + chunk]
            x = np.asarray(rows_of(int(origin), row_N[sel]), np.int32)
            e_new, logits_new = embed_rows(model, teacher.params, teacher.model_state, x, bs)
            if mode == "offsets":
                e_old, logits_old = embed_rows(
                    model, previous_teacher.params, previous_teacher.model_state, x, bs
                )
                e_new += e[sel] - e_old
                logits_new += logits[sel] - logits_old
            e[sel], logits[sel] = e_new, logits_new
    return memory.replace(
        e_NxFxD=memory_lib.on_device(e, np.float32),
        logits_NxK=memory_lib.on_device(logits, np.float32),
    )


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


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc's malloc_trim; elsewhere a no-op).

    Buffers of the previous stage's phase 2 and of this stage's passes (the memory, its
    padded copies and moments, selection chunks) are freed, but glibc keeps most of them
    resident in its heap, and they grow with the rows: measured at 16M lines, ~200 MB more
    RssAnon under the retention pass than at 4M. Results are unchanged.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    group_split: str = "balanced",
    reanchor_mode: str = "off",
    previous_teacher=None,
    rows_of=None,
    label_mix: float = 0.0,
    strata: int = 1,
    pick_seed: int | None = None,
) -> tuple[Memory, dict]:
    """D_syn^t before refinement. `teacher` is phi_t (a TrainState: .params, .model_state).
    `retain`: rows kept from `previous` (default n_t, the paper's rule). `reanchor_mode`,
    `previous_teacher` (phi_{t-1}) and `rows_of`: see `reanchor` (applied to `previous` first).
    `label_mix`: the new rows' soft labels pulled toward their hard labels (`mix_labels`);
    carried rows keep theirs (re-anchoring by "offsets" keeps the mix as part of the offset).
    `strata`: the new rows from one EL2N window (1) or spread over score levels (`rank_windows`);
    `pick_seed`: at a random place in each score range rather than its middle (`pick_rng`).

    Returns the memory (new rows first, then retained rows) and a dict of counts for logging.
    """
    params, model_state = teacher.params, teacher.model_state
    n_t = budget(len(stage), ratio)
    release_free_heap()  # what the previous stage's phase 2 freed
    # Streamed: scores on a scratch memmap, selection in chunks (same rows as select_boundary).
    idx = stage_selection(
        model,
        teacher,
        stage,
        n_t,
        percentile,
        grouped=True,
        batch_size=batch_size,
        split=group_split,
        strata=strata,
        pick_seed=pick_seed,
    )
    y = np.asarray(stage.y_NxK[idx])
    new = to_memory(
        model,
        params,
        model_state,
        stage.x_NxF[idx],
        origin=t,
        rows_N=idx,
        batch_size=batch_size,
        y_NxK=y,
        label_mix=label_mix,
    )
    groups = int(group_sizes_chunked(stage.y_NxK)[0].size)
    info = {"n_t": n_t, "selected": int(idx.size), "groups": groups}
    if previous is None or not fusion or len(previous) == 0:
        info["retained"] = 0
        return new, info
    info["reanchored"] = 0
    if reanchor_mode != "off":
        if rows_of is None:
            raise ValueError("Re-anchoring the carried memory needs rows_of(origin, rows_N).")
        previous = reanchor(
            model, teacher, previous_teacher, previous, rows_of, reanchor_mode, batch_size
        )
        info["reanchored"] = int((np.asarray(previous.row_N) >= 0).sum())
    # The retention pass is phase 1's peak (its temporaries come on top of all that is live):
    # the reanchoring's and the selection's freed buffers go back to the OS before it.
    release_free_heap()
    targets = {"e": new.e_NxFxD, "y": jnp.asarray(y, jnp.float32)}
    alpha = retention_scores(
        model, params["dense"], model_state, previous, targets, chunk_size=chunk_size
    )
    keep = retain_top(np.asarray(alpha), n_t if retain is None else retain)
    info["retained"] = int(keep.size)
    return memory_lib.concat(new, memory_lib.take(previous, keep)), info
