"""Exact evaluation metrics over a whole evaluation set, as FuxiCTR computes them.

AUC is the Mann-Whitney statistic with tied scores given average ranks (what sklearn's
`roc_auc_score` returns); LogLoss is the mean binary cross-entropy. Both run in float64 on the
host, over the full prediction arrays, never per batch.
"""

from __future__ import annotations

import numpy as np


def auc(labels_N: np.ndarray, scores_N: np.ndarray) -> float:
    """ROC AUC with ties counted as one half. NaN when only one class is present."""
    y = np.asarray(labels_N).astype(bool).ravel()
    s = np.asarray(scores_N, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # Average rank (1-based) of every run of tied scores.
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss_from_logits(labels_N: np.ndarray, logits_N: np.ndarray) -> float:
    """Mean BCE computed from logits: softplus(z) - y*z, exact with no probability clipping."""
    y = np.asarray(labels_N, dtype=np.float64).ravel()
    z = np.asarray(logits_N, dtype=np.float64).ravel()
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def logloss(labels_N: np.ndarray, probs_N: np.ndarray, eps: float = 1e-15) -> float:
    """Mean BCE from probabilities, clipped to [eps, 1 - eps] like sklearn's log_loss."""
    y = np.asarray(labels_N, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs_N, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def multitask_metrics(labels_NxK: np.ndarray, logits_NxK: np.ndarray, tasks: list[str]) -> dict:
    """Per-task AUC and LogLoss plus their means over tasks (FuxiCTR's unprefixed `AUC`/`logloss`)."""
    per_task = {}
    for k, name in enumerate(tasks):
        per_task[name] = {
            "auc": auc(labels_NxK[:, k], logits_NxK[:, k]),
            "logloss": logloss_from_logits(labels_NxK[:, k], logits_NxK[:, k]),
        }
    return {
        "auc": float(np.mean([m["auc"] for m in per_task.values()])),
        "logloss": float(np.mean([m["logloss"] for m in per_task.values()])),
        "per_task": per_task,
    }
