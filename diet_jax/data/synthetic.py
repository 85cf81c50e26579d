"""A synthetic multi-task stream with a known ground truth, drift between stages, and bounded memory.

The hidden scorer is a factorization machine per task over Zipf-distributed categorical fields:

    u_f = V_f[x_f] @ A_k                         (A_k = A_shared + mix * B_k: correlated tasks)
    s_k = sum_{f<g} <u_f, u_g> + beta_k * sum_f b_f[x_f]
    p(click) = sigmoid(c_1 + a_1 s_1)
    p(task k | click) = sigmoid(c_k + a_k s_k),  task k > 1 happens only after a click (a cascade)

Scales a_k make every task's logit spread equal `signal_scale`; intercepts c_k are found by
bisection so the stage-1 positive rates match `positive_rates`. The true marginal probabilities
are stored with every stage (`p_true`), so the best achievable AUC is known.

Drift, applied before every stage after the first: popularity shift (a fraction of the
rank-to-id mapping of every field is permuted) and preference shift (latent vectors and biases
move by an AR(1) step, V <- sqrt(1 - rho) V + sqrt(rho) noise).

What makes history matter (docs/configuration.md, "The synthetic stream"): a returning cohort.
A fraction `history_cohort` of the tail ids (outside the `cohort_head` most popular ranks) of
every field in `history_fields` is active in the historical stages only: it is absent from the
subsequent block and comes back on the validation and test days, where a share
`cohort_return_share` of the rows draw that field's id from the cohort. While absent the
cohort's preferences are frozen, so what the historical stages taught about those ids is still
true on the test day, and only a model that learned from history (full data, or a memory that
carries it) knows how to read their embeddings: a network trained on the subsequent block alone
(warm start) never saw them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from diet_jax import metrics
from diet_jax.data.store import FeatureMap, StoreWriter

_CALIBRATION_ROWS = 200_000


@dataclasses.dataclass
class _World:
    """The hidden state of the stream at one point in time."""

    cdf_F: list[np.ndarray]  # Zipf CDF over ranks, per field
    rank_to_id_F: list[np.ndarray]
    latent_F: list[np.ndarray]  # [V_f, r]
    bias_F: list[np.ndarray]  # [V_f]
    proj_KxRxR: np.ndarray
    beta_K: np.ndarray
    scale_K: np.ndarray
    intercept_K: np.ndarray
    cohort_F: list[np.ndarray | None]  # bool [V_f]: the returning cohort's ids (None: no cohort)


def stage_plan(data_cfg) -> list[tuple[str, str, int]]:
    """(name, role, rows) of every stage, in time order."""
    plan = [
        (f"stage_{t + 1}", "historical", data_cfg.stage_rows)
        for t in range(data_cfg.num_historical_stages)
    ]
    plan += [
        ("subsequent", "subsequent", data_cfg.subsequent_rows),
        ("validation", "validation", data_cfg.validation_rows),
        ("test", "test", data_cfg.test_rows),
    ]
    return plan


def check(cfg) -> None:
    """Rejects bad `data` values of the synthetic stream with the key's name (ValueError)."""
    _check_config(cfg)


def _check_config(cfg) -> None:
    f = len(cfg.vocab_sizes)
    if f < 2:
        raise ValueError("data.vocab_sizes needs at least two fields.")
    if len(cfg.field_names) != f:
        raise ValueError(f"data.field_names has {len(cfg.field_names)} names for {f} fields.")
    if len(cfg.positive_rates) != len(cfg.tasks):
        raise ValueError("data.positive_rates needs one rate per task in data.tasks.")
    rates = list(cfg.positive_rates)
    if not all(0 < r < 1 for r in rates) or any(r > rates[0] for r in rates[1:]):
        raise ValueError(
            "data.positive_rates must lie in (0, 1) and later tasks happen only after the first "
            f"(a cascade), so none may exceed the first; got {rates}."
        )
    for name in ("stage_rows", "subsequent_rows", "validation_rows", "test_rows", "chunk_rows"):
        if int(cfg[name]) <= 0:
            raise ValueError(f"data.{name} must be positive, got {cfg[name]}.")
    if cfg.num_historical_stages < 1:
        raise ValueError("data.num_historical_stages must be at least 1.")
    unknown = sorted(set(cfg.history_fields) - set(cfg.field_names))
    if unknown:
        raise ValueError(f"data.history_fields names unknown fields {unknown}.")
    for name in ("history_cohort", "cohort_return_share", "interaction_drift"):
        if not 0 <= float(cfg[name]) < 1:
            raise ValueError(f"data.{name} must lie in [0, 1), got {cfg[name]}.")
    if int(cfg.cohort_head) < 0:
        raise ValueError(f"data.cohort_head must be non-negative, got {cfg.cohort_head}.")


def _fresh_projection(cfg, rng: np.random.Generator) -> np.ndarray:
    """Task interaction matrices A_k = A_shared + mix * B_k, [K, R, R]."""
    r, k = cfg.latent_dim, len(cfg.tasks)
    shared = rng.normal(0, 1 / np.sqrt(r), size=(r, r))
    private = rng.normal(0, 1 / np.sqrt(r), size=(k, r, r))
    return (shared[None] + cfg.task_mix * private).astype(np.float32)


def _initial_world(cfg, rng: np.random.Generator) -> _World:
    r = cfg.latent_dim
    k = len(cfg.tasks)
    cdfs, perms, latents, biases = [], [], [], []
    for v in cfg.vocab_sizes:
        p = 1.0 / np.arange(1, v + 1, dtype=np.float64) ** cfg.zipf_exponent
        cdfs.append(np.cumsum(p / p.sum()))
        perms.append(rng.permutation(v).astype(np.int32))
        latents.append(rng.normal(0, 1 / np.sqrt(r), size=(v, r)).astype(np.float32))
        biases.append(rng.normal(0, 1.0, size=v).astype(np.float32))
    proj = _fresh_projection(cfg, rng)
    beta = rng.uniform(0.3, 1.0, size=k).astype(np.float32)
    cohorts = []
    for name, v, perm in zip(cfg.field_names, cfg.vocab_sizes, perms, strict=True):
        m = int(round(cfg.history_cohort * max(v - cfg.cohort_head, 0)))
        if name not in cfg.history_fields or m == 0:
            cohorts.append(None)
            continue
        # Tail ids only: the head stays, so the subsequent block keeps its popular ids.
        members = rng.choice(perm[cfg.cohort_head :], size=m, replace=False)
        cohorts.append(np.zeros(v, bool))
        cohorts[-1][members] = True
    return _World(
        cdfs,
        perms,
        latents,
        biases,
        proj,
        beta,
        np.ones(k, np.float32),
        np.zeros(k, np.float32),
        cohorts,
    )


def returning_cohort(cfg) -> dict[str, np.ndarray]:
    """The returning cohort's ids (sorted) per field of `history_fields`, as `generate` draws it."""
    world = _initial_world(cfg, np.random.default_rng([cfg.seed, 0]))
    return {
        name: np.flatnonzero(c)
        for name, c in zip(cfg.field_names, world.cohort_F, strict=True)
        if c is not None
    }


def _drift(world: _World, cfg, rng: np.random.Generator, *, freeze_cohort: bool) -> _World:
    """One stage of drift; `freeze_cohort`: the absent cohort's preferences do not move."""
    rho = cfg.preference_drift
    perms, latents, biases = [], [], []
    for perm, lat, b, cohort in zip(
        world.rank_to_id_F, world.latent_F, world.bias_F, world.cohort_F, strict=True
    ):
        perm = perm.copy()
        m = int(round(cfg.popularity_shift * perm.size))
        if m > 1:
            pos = rng.choice(perm.size, size=m, replace=False)
            perm[pos] = perm[rng.permutation(pos)]
        perms.append(perm)
        latents.append(
            (
                np.sqrt(1 - rho) * lat
                + np.sqrt(rho) * rng.normal(0, 1 / np.sqrt(lat.shape[1]), lat.shape)
            ).astype(np.float32)
        )
        biases.append(
            (np.sqrt(1 - rho) * b + np.sqrt(rho) * rng.normal(0, 1.0, b.shape)).astype(np.float32)
        )
        if freeze_cohort and cohort is not None:
            latents[-1][cohort] = lat[cohort]
            biases[-1][cohort] = b[cohort]
    # Interactions drift too (AR(1) towards fresh matrices of the same law, so the calibrated
    # spread of the logit is kept in expectation).
    g = cfg.interaction_drift
    proj = np.sqrt(1 - g) * world.proj_KxRxR + np.sqrt(g) * _fresh_projection(cfg, rng)
    return dataclasses.replace(
        world,
        rank_to_id_F=perms,
        latent_F=latents,
        bias_F=biases,
        proj_KxRxR=proj.astype(np.float32),
    )


def _draw(cdf: np.ndarray, perm: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    return perm[np.minimum(np.searchsorted(cdf, rng.random(rows)), cdf.size - 1)]


def _cohort_cdf(cdf: np.ndarray, perm: np.ndarray, cohort: np.ndarray):
    """(ids, cdf) of the cohort's popularity, renormalised: the Zipf law restricted to it."""
    pmf_rank = np.diff(cdf, prepend=0.0)
    ranks = np.flatnonzero(cohort[perm])
    c = np.cumsum(pmf_rank[ranks])
    return perm[ranks], c / c[-1]


def _sample_ids(
    world: _World, rows: int, rng: np.random.Generator, cohort_mode: str = "all", share=0.0
) -> np.ndarray:
    """Zipf ids per field. cohort_mode: "all" (historical), "absent" (the cohort's ids are
    redrawn from the rest), "return" (a share `share` of each row's cohort-field ids come from
    the cohort)."""
    x = np.empty((rows, len(world.cdf_F)), np.int32)
    for f, (cdf, perm, cohort) in enumerate(
        zip(world.cdf_F, world.rank_to_id_F, world.cohort_F, strict=True)
    ):
        ids = _draw(cdf, perm, rows, rng)
        if cohort is not None and cohort_mode == "absent":
            bad = np.flatnonzero(cohort[ids])
            while bad.size:  # rejection: the cohort holds a minority of the mass
                ids[bad] = _draw(cdf, perm, bad.size, rng)
                bad = bad[cohort[ids[bad]]]
        elif cohort is not None and cohort_mode == "return":
            members, ccdf = _cohort_cdf(cdf, perm, cohort)
            back = np.flatnonzero(rng.random(rows) < share)
            ids[back] = _draw(ccdf, members, back.size, rng)
        x[:, f] = ids
    return x


def _in_cohort(world: _World, x_NxF: np.ndarray) -> np.ndarray:
    """bool [N]: the row holds a cohort id in some field."""
    back = np.zeros(x_NxF.shape[0], bool)
    for f, cohort in enumerate(world.cohort_F):
        if cohort is not None:
            back |= cohort[x_NxF[:, f]]
    return back


def _raw_scores(world: _World, x_NxF: np.ndarray) -> np.ndarray:
    """The unscaled FM score of every task, [N, K]."""
    lat_NxFxR = np.stack([world.latent_F[f][x_NxF[:, f]] for f in range(x_NxF.shape[1])], axis=1)
    bias_N = sum(world.bias_F[f][x_NxF[:, f]] for f in range(x_NxF.shape[1]))
    u_KxNxFxR = np.einsum("nfr,krs->knfs", lat_NxFxR, world.proj_KxRxR)
    pair_KxN = 0.5 * ((u_KxNxFxR.sum(2) ** 2).sum(-1) - (u_KxNxFxR**2).sum((2, 3)))
    return (pair_KxN + world.beta_K[:, None] * bias_N[None]).T


def _logits(world: _World, x_NxF: np.ndarray) -> np.ndarray:
    return world.intercept_K + world.scale_K * _raw_scores(world, x_NxF)


def _marginals(logits_NxK: np.ndarray) -> np.ndarray:
    """True marginal probabilities of the cascade: p1, then p1 * p(k | click)."""
    p = 1 / (1 + np.exp(-logits_NxK.astype(np.float64)))
    p[:, 1:] *= p[:, :1]
    return p


def _calibrate(world: _World, cfg, rng: np.random.Generator) -> _World:
    """Sets scales to `signal_scale` and intercepts to hit the target positive rates."""
    x = _sample_ids(world, _CALIBRATION_ROWS, rng)
    raw = _raw_scores(world, x)
    mean_raw = raw.mean(0)
    scale = (cfg.signal_scale / raw.std(0)).astype(np.float32)
    z = (raw - mean_raw) * scale
    intercept = np.zeros(z.shape[1])
    rates = np.asarray(cfg.positive_rates, dtype=np.float64)
    p1 = None
    for k in range(z.shape[1]):
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            pk = 1 / (1 + np.exp(-(z[:, k] + mid)))
            rate = pk.mean() if k == 0 else (p1 * pk).mean()
            lo, hi = (mid, hi) if rate < rates[k] else (lo, mid)
        intercept[k] = (lo + hi) / 2
        if k == 0:
            p1 = 1 / (1 + np.exp(-(z[:, 0] + intercept[0])))
    # The bisection ran on centred scores; fold the centring into the intercept.
    intercept = intercept - scale * mean_raw
    return dataclasses.replace(world, scale_K=scale, intercept_K=intercept.astype(np.float32))


def generate(cfg, root: str, *, progress: bool = True) -> FeatureMap:
    """Writes the synthetic stream described by `cfg` (config.data) as a stage store at `root`."""
    _check_config(cfg)
    rng_world = np.random.default_rng([cfg.seed, 0])
    world = _calibrate(_initial_world(cfg, rng_world), cfg, rng_world)
    plan = stage_plan(cfg)
    total = sum(rows for _, _, rows in plan)
    oracle = {}
    with StoreWriter(root, "synthetic", cfg.field_names, cfg.vocab_sizes, cfg.tasks) as writer:
        bar = tqdm(total=total, desc="generate synthetic stream", unit="row", disable=not progress)
        for t, (name, role, rows) in enumerate(plan):
            if t > 0:
                drift_rng = np.random.default_rng([cfg.seed, 1, t])
                world = _drift(world, cfg, drift_rng, freeze_cohort=role != "historical")
            mode = {"historical": "all", "subsequent": "absent"}.get(role, "return")
            if role == "historical":
                history_world = world
            arrays = writer.new_stage(name, role, rows, {"p_true": (np.float32, len(cfg.tasks))})
            for c, start in enumerate(range(0, rows, cfg.chunk_rows)):
                n = min(cfg.chunk_rows, rows - start)
                rng = np.random.default_rng([cfg.seed, 2, t, c])
                x = _sample_ids(world, n, rng, mode, cfg.cohort_return_share)
                p = _marginals(_logits(world, x))
                if mode == "return":
                    # Returning ids behave as when last seen: rows that hold one are scored by
                    # the world of the last historical stage (its interactions, its scales).
                    back = _in_cohort(world, x)
                    p[back] = _marginals(_logits(history_world, x[back]))
                u1 = rng.random(n)
                y = np.zeros((n, p.shape[1]), np.uint8)
                y[:, 0] = u1 < p[:, 0]
                cond = p[:, 1:] / np.maximum(p[:, :1], 1e-12)
                y[:, 1:] = (rng.random((n, p.shape[1] - 1)) < cond) & y[:, :1].astype(bool)
                arrays["x"][start : start + n] = x
                arrays["y"][start : start + n] = y
                arrays["p_true"][start : start + n] = p
                bar.update(n)
            for a in arrays.values():
                a.flush()
            if role in ("validation", "test"):
                y_all, p_all = np.asarray(arrays["y"]), np.asarray(arrays["p_true"])
                oracle[name] = metrics.multitask_metrics(
                    y_all, np.log(p_all) - np.log1p(-np.minimum(p_all, 1 - 1e-7)), list(cfg.tasks)
                )
            del arrays
        bar.close()
        writer.extra = {
            "generator": "diet_jax.data.synthetic",
            "seed": int(cfg.seed),
            "oracle": oracle,
            "positive_rates_target": list(cfg.positive_rates),
        }
        return writer.finish()
