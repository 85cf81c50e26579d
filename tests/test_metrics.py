"""AUC and LogLoss against brute-force computations, ties included."""

import itertools

import numpy as np
import pytest

from diet_jax import metrics


def brute_auc(y, s):
    pos = [si for yi, si in zip(y, s, strict=True) if yi]
    neg = [si for yi, si in zip(y, s, strict=True) if not yi]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.random(n) < 0.3
    y[:2] = [True, False]
    s = rng.integers(0, 6, n).astype(np.float32)  # few distinct values: many ties
    assert metrics.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_edge_cases():
    assert metrics.auc([0, 1], [0.1, 0.9]) == 1.0
    assert metrics.auc([1, 0], [0.1, 0.9]) == 0.0
    assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(metrics.auc([1, 1], [0.1, 0.2]))


def test_logloss_from_logits_matches_definition():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 100)
    y = (rng.random(100) < 0.4).astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    brute = -np.mean(
        [yi * np.log(pi) + (1 - yi) * np.log(1 - pi) for yi, pi in zip(y, p, strict=True)]
    )
    assert metrics.logloss_from_logits(y, z) == pytest.approx(brute, rel=1e-10)
    assert metrics.logloss(y, p) == pytest.approx(brute, rel=1e-10)


def test_logloss_from_logits_is_finite_for_saturated_logits():
    assert metrics.logloss_from_logits([1.0, 0.0], [100.0, -100.0]) == pytest.approx(0.0, abs=1e-30)
    assert metrics.logloss_from_logits([0.0], [100.0]) == pytest.approx(100.0)


def test_multitask_metrics_means_over_tasks():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    z = np.array([[2.0, -1.0], [-1.0, 0.5], [1.0, 0.0], [0.0, 1.0]])
    m = metrics.multitask_metrics(y, z, ["a", "b"])
    assert m["per_task"]["a"]["auc"] == pytest.approx(brute_auc(y[:, 0], z[:, 0]))
    assert m["per_task"]["b"]["auc"] == pytest.approx(brute_auc(y[:, 1], z[:, 1]))
    assert m["auc"] == pytest.approx((m["per_task"]["a"]["auc"] + m["per_task"]["b"]["auc"]) / 2)
    assert m["logloss"] == pytest.approx(np.mean([m["per_task"][t]["logloss"] for t in "ab"]))
