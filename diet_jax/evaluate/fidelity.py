"""Fidelity of a reduced-data method: does it rank architectures as the full data does?

Per method: Spearman's rho and Kendall's tau-b between the candidates' test AUCs (seed means)
under the method and under full_data, with bootstrap intervals over candidates and seeds, and
two cost ratios (full-data training time / method training time), end to end and over the
historical phase only; distillation and selection are excluded and reported separately.
"""

from __future__ import annotations

import copy

import numpy as np


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, np.float64)
    sorted_v = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Pearson correlation of average ranks (ties share their mean rank). NaN if undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _kendall_rows(a_DxC: np.ndarray, b_DxC: np.ndarray) -> np.ndarray:
    """`kendall` of every row pair (a[d], b[d]) at once: [D] taus."""
    i, j = np.triu_indices(a_DxC.shape[1], k=1)
    da, db = np.sign(a_DxC[:, i] - a_DxC[:, j]), np.sign(b_DxC[:, i] - b_DxC[:, j])
    denom = np.sqrt((da != 0).sum(1).astype(np.float64) * (db != 0).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (da * db).sum(1) / denom, np.nan)


def kendall(a, b) -> float:
    """Kendall's tau-b over all pairs, with the tie correction. NaN if undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return float("nan")
    return float(_kendall_rows(a[None], b[None])[0])


def seed_stats(values) -> tuple[float, float]:
    """(mean, sample standard deviation, ddof=1) over seeds; the std of one seed is 0.0."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def bootstrap_resamples(
    num_candidates: int, num_seeds: int, n: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n resamples (candidates_C, seeds of the method C x S, seeds of the reference C x S).

    Candidates are drawn with replacement, and for every drawn candidate the seeds of each
    method's entry are drawn with replacement, independently.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = rng.integers(0, num_candidates, num_candidates)
        out.append(
            (
                c,
                rng.integers(0, num_seeds, (num_candidates, num_seeds)),
                rng.integers(0, num_seeds, (num_candidates, num_seeds)),
            )
        )
    return out


def bootstrap_interval(
    method_CxS, ref_CxS, stat=None, resamples=None, n: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(mean AUC of the method, mean AUC of the reference).

    method_CxS / ref_CxS: per-seed AUCs of every candidate (same candidates, same seed count).
    Resamples whose statistic is undefined (all draws one candidate) are dropped.
    """
    stat = stat or kendall
    a, b = np.asarray(method_CxS, np.float64), np.asarray(ref_CxS, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"Per-seed AUCs must be two C x S arrays, got {a.shape} and {b.shape}.")
    if resamples is None:
        resamples = bootstrap_resamples(a.shape[0], a.shape[1], n)
    values = []
    for c, sa, sb in resamples:
        va = np.take_along_axis(a[c], sa, axis=1).mean(axis=1)
        vb = np.take_along_axis(b[c], sb, axis=1).mean(axis=1)
        values.append(stat(va, vb))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def _entries_by_model(results: list[dict], method: str) -> list[dict]:
    """`method`'s entries in candidate-name order (the order every per-seed array uses)."""
    return sorted((r for r in results if r["method"] == method), key=lambda r: r["model"])


def _per_seed_aucs(entries: list[dict]) -> np.ndarray | None:
    """C x S per-seed AUCs when every entry holds the same number of seeds, else None."""
    rows = [[p["auc"] for p in e["per_seed"]] if "per_seed" in e else [e["auc"]] for e in entries]
    if len({len(r) for r in rows}) != 1:
        return None
    return np.asarray(rows, np.float64)


def _per_epoch(entry: dict) -> float:
    """Historical seconds per historical epoch (NaN without epochs: Cold and Warmup Start)."""
    epochs = entry.get("historical_epochs", 0)
    return entry.get("historical_seconds", float("nan")) / epochs if epochs else float("nan")


def fidelity_table(
    results: list[dict], reference_method: str = "full_data", bootstrap: int = 1000
) -> dict:
    """{method: {"spearman", "kendall", "kendall_ci", "spearman_ci", "cost_ratio", ...}} over the
    candidates both methods ran.

    `cost_ratio` (= `cost_ratio_end_to_end`) = sum of full-data train_seconds / sum of the
    method's; `cost_ratio_historical` = the same over the historical phase only (full data's
    epochs over the historical stages / the reduced-data epochs; NaN for methods without one);
    `cost_ratio_historical_per_epoch` = the same per epoch (Full Data trains one epoch, a
    reduced method evaluate.max_epochs): the paper's Table 5 "Time/ep" comparison.
    Correlations are over the seed-mean AUCs; their 95% intervals resample candidates and seeds
    (`bootstrap` resamples; 0 = none). `seed_kendall`: the method's leave-one-seed-out tau with
    itself (`seed_agreement`). `single_seed_kendall` (with several seeds): the mean over seeds of
    the tau between one seed's AUCs and the reference's seed means.
    """
    by = {(r["method"], r["model"]): r for r in results}
    ref_models = sorted(m for (meth, m) in by if meth == reference_method)
    out = {}
    for method in sorted({meth for meth, _ in by} - {reference_method, "reference"}):
        models = [m for m in ref_models if (method, m) in by]
        if not models:
            continue
        mine = [by[(method, m)] for m in models]
        ref = [by[(reference_method, m)] for m in models]
        ref_auc, auc = [r["auc"] for r in ref], [r["auc"] for r in mine]
        ref_s = sum(r["train_seconds"] for r in ref)
        s = sum(r["train_seconds"] for r in mine)
        ref_h = sum(r.get("historical_seconds", float("nan")) for r in ref)
        h = sum(r.get("historical_seconds", float("nan")) for r in mine)
        e2e = ref_s / s if s > 0 else float("nan")
        # The paper's Table 5 compares time per epoch: seconds per historical epoch, summed.
        ref_ep = sum(_per_epoch(r) for r in ref)
        ep = sum(_per_epoch(r) for r in mine)
        out[method] = {
            "spearman": spearman(auc, ref_auc),
            "kendall": kendall(auc, ref_auc),
            "cost_ratio": e2e,
            "cost_ratio_end_to_end": e2e,
            "cost_ratio_historical": ref_h / h if h > 0 else float("nan"),
            "cost_ratio_historical_per_epoch": ref_ep / ep if ep > 0 else float("nan"),
            "mean_auc_gap": float(np.mean(np.asarray(auc) - np.asarray(ref_auc))),
            "models": models,
            # The method's own seed-to-seed agreement (NaN with one seed): see seed_agreement.
            "seed_kendall": seed_agreement(mine, method).get("kendall", float("nan")),
        }
        a, b = _per_seed_aucs(mine), _per_seed_aucs(ref)
        if a is not None and b is not None and a.shape[1] > 1:
            # One seed of the method against the reference's seed means, averaged over seeds:
            # set beside "kendall" (seed means against seed means), it says how much of the
            # method's tau comes from averaging its seeds (for Random, new rows per seed; for a
            # method whose rows are one set, only init and order).
            ref_mean = b.mean(axis=1)
            out[method]["single_seed_kendall"] = float(
                np.mean([kendall(a[:, s], ref_mean) for s in range(a.shape[1])])
            )
            # The method's own pool: its candidates' true spread against its seed noise.
            out[method].update(spread_and_noise(a))
        if bootstrap > 0 and a is not None and b is not None and a.shape == b.shape:
            resamples = bootstrap_resamples(a.shape[0], a.shape[1], bootstrap)
            out[method]["kendall_ci"] = list(bootstrap_interval(a, b, kendall, resamples))
            out[method]["spearman_ci"] = list(bootstrap_interval(a, b, spearman, resamples))
            out[method]["bootstrap"] = bootstrap
    return out


def seed_agreement(results: list[dict], method: str) -> dict:
    """How well a method agrees with itself across seeds (leave one seed out).

    For every seed s, Kendall's tau (and Spearman's rho) between the candidates' AUCs at seed s
    and their mean AUC over the other seeds. For Full Data this is the noise ceiling a reduced
    method's tau is read against: a method whose tau against Full Data's mean reaches it ranks
    the pool as well as another Full Data seed would. For a reduced method it says how much of
    its ranking is seed noise. {} with fewer than two candidates or seeds, or unequal seeds.
    """
    entries = _entries_by_model(results, method)
    a = _per_seed_aucs(entries) if len(entries) >= 2 else None
    if a is None or a.shape[1] < 2:
        return {}
    taus, rhos = [], []
    for s in range(a.shape[1]):
        rest = np.delete(a, s, axis=1).mean(axis=1)
        taus.append(kendall(a[:, s], rest))
        rhos.append(spearman(a[:, s], rest))
    return {
        "method": method,
        "kendall_leave_one_seed_out": taus,
        "kendall": float(np.mean(taus)),
        "spearman_leave_one_seed_out": rhos,
        "spearman": float(np.mean(rhos)),
        "models": [r["model"] for r in entries],
    }


def spread_and_noise(auc_CxS) -> dict:
    """How much of a method's ranking of the pool is the candidates and how much is seed noise.

    From per-seed AUCs (C candidates x S seeds): "seed_noise_std", the root-mean-square of the
    candidates' seed stds (ddof 1); "observed_spread_std", the std of the seed means over the
    candidates; "true_spread_std", that spread less the noise's share, sqrt(max(observed^2 -
    noise^2 / S, 0)) (method of moments). "snr" = true spread / (noise / sqrt(S)): the true
    spread in units of a seed mean's noise; the higher, the more a method's tau is its own
    ranking rather than luck. {} with fewer than 2 candidates or seeds.
    """
    a = np.asarray(auc_CxS, np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        return {}
    noise_var = float(np.mean(a.var(1, ddof=1)))
    observed = float(a.mean(1).var(ddof=1))
    true_var = max(observed - noise_var / a.shape[1], 0.0)
    mean_noise = np.sqrt(noise_var / a.shape[1])
    return {
        "true_spread_std": float(np.sqrt(true_var)),
        "observed_spread_std": float(np.sqrt(observed)),
        "seed_noise_std": float(np.sqrt(noise_var)),
        "snr": float(np.sqrt(true_var) / mean_noise) if mean_noise > 0 else float("inf"),
    }


def faithful_tau(auc_CxS, draws: int = 4000, seed: int = 0, level: float = 0.95) -> dict:
    """The Kendall tau that a faithful method would reach against the reference: one whose
    candidates have the reference's true means and its seed noise, both averaged over S seeds.

    From the reference's per-seed AUCs (C candidates x S seeds): each candidate's noise is its
    seed std s_c; the true means are the seed means shrunk toward their grand mean so that their
    variance is the observed one less the noise's share, mean(s_c^2) / S (method of moments; 0
    when the noise explains the whole spread). Two independent S-seed means are drawn around
    them `draws` times. Returns {"mean", "interval" (`level`), "seeds": S, and
    `spread_and_noise`'s keys}; {} with fewer than 2 candidates or seeds. This is the ceiling the
    method's own tau (seed means against seed means) should be read against; `seed_agreement`
    is the stricter one-seed-against-the-rest figure.
    """
    a = np.asarray(auc_CxS, np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        return {}
    n_seeds = a.shape[1]
    mean_C, std_C = a.mean(1), a.std(1, ddof=1)
    parts = spread_and_noise(a)
    observed = parts["observed_spread_std"]
    shrink = parts["true_spread_std"] / observed if observed > 0 else 0.0
    mu_C = mean_C.mean() + (mean_C - mean_C.mean()) * shrink
    rng = np.random.default_rng(seed)
    noise = std_C / np.sqrt(n_seeds)
    x = mu_C + rng.standard_normal((draws, mu_C.size)) * noise
    y = mu_C + rng.standard_normal((draws, mu_C.size)) * noise
    taus = _kendall_rows(x, y)
    taus = taus[np.isfinite(taus)]
    tail = 100 * (1 - level) / 2
    return {
        "mean": float(taus.mean()) if taus.size else float("nan"),
        "interval": [float(np.percentile(taus, tail)), float(np.percentile(taus, 100 - tail))]
        if taus.size
        else [float("nan")] * 2,
        "seeds": int(n_seeds),
        **parts,
    }


def noise_ceiling(results: list[dict], reference_method: str = "full_data") -> dict:
    """`seed_agreement` of the reference method (Full Data's agreement with itself), with
    "faithful_kendall": `faithful_tau` of its per-seed AUCs (what a method that ranks like it,
    with its seed noise, would reach over the same number of seeds)."""
    out = seed_agreement(results, reference_method)
    if out:
        entries = _entries_by_model(results, reference_method)
        out["faithful_kendall"] = faithful_tau(_per_seed_aucs(entries))
    return out


def on_validation_day(res: dict, bootstrap: int = 1000) -> dict:
    """`res` with every entry's AUCs (seed mean, std, per seed) replaced by the final models'
    validation AUCs, and its fidelity recomputed from them."""
    res = copy.deepcopy(res)
    rows = [r for r in res["results"] if r["method"] != "reference"]
    missing = [f"{r['method']}/{r['model']}" for r in rows if "val_auc" not in r["per_seed"][0]]
    if missing:
        raise ValueError(
            f"No validation AUC in {len(missing)} entries (e.g. {missing[0]}): results.json "
            "predates per_seed val_auc; rerun those entries (evaluate.rerun=True)."
        )
    for r in rows:
        for p in r["per_seed"]:
            p["auc"] = p["val_auc"]
        aucs = [p["auc"] for p in r["per_seed"]]
        r["auc"], r["auc_std"] = seed_stats(aucs)
    res["results"] = rows
    res["fidelity"] = fidelity_table(rows, bootstrap=bootstrap)
    return res


def phase_split(infos: list[dict], methods=("random", "el2n", "kmeans", "diet")) -> dict:
    """Where each reduced method's validation AUC comes from, pool means over candidates and
    seeds of the runs' candidate_info: the rows phase's best epoch ("rows", scored on the
    evaluate.val_rows subsample that chose it, so a little optimistic, alike for every method)
    and the final model after the fine-tune ("final", the whole validation day). `infos`: the
    runs' results.json["candidate_info"]; a method that none of them holds is left out.

    Where its ranking comes from, too: "rows_kendall" and "final_kendall", Kendall tau over the
    candidates of the two phases' AUCs (a candidate's mean over runs of its seed means) against
    Full Data's final validation AUCs (NaN without Full Data on two common candidates)."""

    def per_run(method, value):  # {candidate: [seed mean of each run that holds it]}
        got = {}
        for info in infos:
            for key, runs in info.items():
                if key.split("/")[0] == method:
                    got.setdefault(key.split("/", 1)[1], []).append(
                        np.mean([value(r) for r in runs])
                    )
        return got

    full = {
        m: np.mean(v) for m, v in per_run("full_data", lambda r: r.get("val_auc", np.nan)).items()
    }
    out = {}
    for method in methods:
        rows_m = per_run(method, lambda r: np.nanmax(r["val_auc_per_epoch"]))
        if not rows_m:
            continue
        final_m = per_run(method, lambda r: r["val_auc"])
        # Pool means over every (candidate, run) entry; the taus over candidates.
        rows = np.mean([v for vs in rows_m.values() for v in vs])
        final = np.mean([v for vs in final_m.values() for v in vs])
        common = sorted(set(full) & set(rows_m))
        ref = [full[m] for m in common]
        out[method] = {
            "rows": float(rows),
            "final": float(final),
            "finetune": float(final - rows),
            "candidates_x_runs": sum(len(vs) for vs in rows_m.values()),
            "rows_kendall": kendall([np.mean(rows_m[m]) for m in common], ref),
            "final_kendall": kendall([np.mean(final_m[m]) for m in common], ref),
        }
    return out


def candidate_ranks(results: list[dict], params: dict[str, int], methods) -> dict:
    """Where each method's ranking of the pool parts from Full Data's (rank_by_candidate.py).

    `results`: entries with "method", "model", "auc" (seed mean) and "auc_std"; `params`:
    {candidate: dense parameter count}, the pool; `methods`: those to report, in order (the ones
    missing a candidate of the pool are left out). Returns {"models": [candidates in Full Data's
    order], "methods": [...], "rank": {method: [rank per model, 1 = best AUC, ties averaged]},
    "auc": {method: [...]}, "summary": {method: {"spread" (best - worst AUC), "seed_std" (mean
    std over seeds of a candidate's AUC), "kendall" (vs Full Data), "size_spearman" (AUCs vs
    log(params))}}}.
    """
    by = {(r["method"], r["model"]): r for r in results}
    models = sorted(params)
    methods = [m for m in methods if all((m, c) in by for c in models)]
    if "full_data" not in methods:
        raise ValueError("No Full Data entry for every candidate of the pool.")
    auc = {m: np.array([by[(m, c)]["auc"] for c in models]) for m in methods}
    order = np.argsort(-auc["full_data"], kind="stable")
    log_p = np.log([params[c] for c in models])
    summary = {
        m: {
            "spread": float(auc[m].max() - auc[m].min()),
            "seed_std": float(np.mean([by[(m, c)].get("auc_std", np.nan) for c in models])),
            "kendall": kendall(auc[m], auc["full_data"]),
            "size_spearman": spearman(auc[m], log_p),
        }
        for m in methods
    }
    rank = {m: (len(models) + 1 - _average_ranks(auc[m]))[order].tolist() for m in methods}
    return {
        "models": [models[i] for i in order],
        "methods": methods,
        "rank": rank,
        "auc": {m: auc[m][order].tolist() for m in methods},
        "summary": summary,
    }
