"""Fidelity of a reduced-data method: does it rank architectures as the full data does?

Per method: Spearman's rho and Kendall's tau-b between the candidates' test AUCs under the
method and under full_data, and the cost ratio (full-data training time / method training time,
distillation excluded and reported separately).
"""

from __future__ import annotations

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


def kendall(a, b) -> float:
    """Kendall's tau-b over all pairs, with the tie correction. NaN if undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return float("nan")
    i, j = np.triu_indices(a.size, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordant_minus_discordant = (da * db).sum()
    n_a, n_b = (da != 0).sum(), (db != 0).sum()
    denom = np.sqrt(float(n_a) * float(n_b))
    return float(concordant_minus_discordant / denom) if denom > 0 else float("nan")


def fidelity_table(results: list[dict], reference_method: str = "full_data") -> dict:
    """{method: {"spearman", "kendall", "cost_ratio", "models"}} over the models both methods ran.

    `cost_ratio` = sum of full-data train_seconds / sum of the method's train_seconds over those
    models.
    """
    by = {(r["method"], r["model"]): r for r in results}
    ref_models = sorted(m for (meth, m) in by if meth == reference_method)
    out = {}
    for method in sorted({meth for meth, _ in by} - {reference_method, "reference"}):
        models = [m for m in ref_models if (method, m) in by]
        if not models:
            continue
        ref_auc = [by[(reference_method, m)]["auc"] for m in models]
        auc = [by[(method, m)]["auc"] for m in models]
        ref_s = sum(by[(reference_method, m)]["train_seconds"] for m in models)
        s = sum(by[(method, m)]["train_seconds"] for m in models)
        out[method] = {
            "spearman": spearman(auc, ref_auc),
            "kendall": kendall(auc, ref_auc),
            "cost_ratio": ref_s / s if s > 0 else float("nan"),
            "mean_auc_gap": float(np.mean(np.asarray(auc) - np.asarray(ref_auc))),
            "models": models,
        }
    return out
