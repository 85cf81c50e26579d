"""DIET phase 1: selection on hand-made scores, conversion, memory fusion, memory checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from diet_jax import influence
from diet_jax.distill import memory as memory_lib
from diet_jax.distill import phase1
from diet_jax.models import build_model
from diet_jax.train.steps import create_train_state

# ------------------------------------------------------------------ selection by hand


@pytest.mark.parametrize(
    "sizes, n, expected",
    [
        ([10, 10, 10], 9, [3, 3, 3]),  # equal shares
        ([10, 10, 10], 10, [4, 3, 3]),  # remainder: most rows left, then the earlier group
        ([10, 3, 12], 10, [3, 3, 4]),
        ([1, 10, 10], 9, [1, 4, 4]),  # a tiny group's unused share is redistributed
        ([2, 3, 100], 30, [2, 3, 25]),  # groups smaller than their share
        ([2, 3], 10, [2, 3]),  # budget above the stage: everything
        ([5, 5], 0, [0, 0]),
        ([0, 4], 3, [0, 3]),  # an empty group takes nothing
    ],
)
def test_split_budget(sizes, n, expected):
    counts = phase1.split_budget(sizes, n)
    assert counts.tolist() == expected
    assert counts.sum() == min(n, sum(sizes))


# Ranks by ascending score: idx 1, 5, 3, 7, 0, 8, 4, 6, 2, 9 (rank 0..9).
SCORES = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])


@pytest.mark.parametrize(
    "k, q, expected",
    [
        (3, 0.9, [2, 6, 9]),  # target rank 8.1 -> ranks 7, 8, 9
        (1, 0.9, [2]),  # rank 8
        (2, 0.9, [2, 9]),  # ranks 8, 9 (distance 0.1 + 0.9 beats 1.1 + 0.1)
        (2, 0.5, [0, 8]),  # target rank 4.5 -> ranks 4, 5
        (2, 0.0, [1, 5]),  # lowest ranks
        (4, 1.0, [2, 4, 6, 9]),  # window shifted inside at the top edge: ranks 6..9
        (12, 0.9, list(range(10))),  # more than the group: everything
        (0, 0.9, []),
    ],
)
def test_select_percentile_by_hand(k, q, expected):
    assert phase1.select_percentile(SCORES, k, q).tolist() == expected


def test_rank_windows_by_hand():
    assert phase1.rank_windows(100, 10, 0.5) == [(45, 55)]  # one window, centred on 49.5
    # 4 ranges of 25 ranks; 10 rows split 3, 3, 2, 2 (largest remainder, earlier first); each
    # range's take centred in it: 25 ranks, 3 rows -> 11..13; 2 rows -> 12..13.
    assert phase1.rank_windows(100, 10, 0.5, 4) == [(11, 14), (36, 39), (62, 64), (87, 89)]
    # S >= k: one row from the middle of each of k ranges (every 10th rank), q unused.
    want = [(5 + 10 * i, 6 + 10 * i) for i in range(10)]
    assert phase1.rank_windows(100, 10, 0.0, 10) == phase1.rank_windows(100, 10, 0.9, 50) == want
    assert phase1.rank_windows(100, 10, 0.3, 0) == want  # 0: one range per row kept
    # Ranges of 3, 4, 4 ranks asked for 3, 4, 3 rows: never more than a range holds.
    assert phase1.rank_windows(11, 10, 0.5, 3) == [(0, 3), (3, 7), (8, 11)]
    assert phase1.rank_windows(10, 12, 0.5, 3) == [(0, 10)]  # more than there is: everything
    assert phase1.rank_windows(10, 0, 0.5, 3) == []
    with pytest.raises(ValueError, match="strata"):
        phase1.rank_windows(10, 2, 0.5, -1)


def test_select_percentile_with_strata_spans_the_scores():
    # SCORES ranked ascending: rows 1, 5, 3, 7, 0, 8, 4, 6, 2, 9. Two strata of five ranks, one
    # row each from its middle (ranks 2 and 7): rows 3 and 6.
    assert phase1.select_percentile(SCORES, 2, 0.9, strata=2).tolist() == [3, 6]
    assert phase1.select_percentile(SCORES, 2, 0.9).tolist() == [2, 9]  # the top window


def test_select_percentile_ties_and_bad_percentile():
    assert phase1.select_percentile(np.zeros(5), 2, 0.9).tolist() == [3, 4]  # ties: row order
    with pytest.raises(ValueError, match="percentile"):
        phase1.select_percentile(SCORES, 2, 1.5)


def test_select_boundary_by_hand():
    # Group A (no label): rows 0..9 with SCORES; group B (click only): rows 10..13; group C (all
    # three tasks): row 14 alone. Budget 9 -> A 4, B 4 (all), C 1 (all).
    y = np.zeros((15, 3), np.uint8)
    y[10:14, 0] = 1
    y[14] = 1
    scores = np.concatenate([SCORES, [0.3, 0.2, 0.1, 0.4], [0.5]])
    picked = phase1.select_boundary(scores, y, 9, 0.9)
    # A: 4 rows nearest rank 8.1 of 10 -> ranks 6..9 -> rows 4, 6, 2, 9.
    assert picked.tolist() == [2, 4, 6, 9, 10, 11, 12, 13, 14]
    assert phase1.label_groups(y)[[0, 10, 14]].tolist() == [0, 1, 7]


def test_proportional_group_budget_by_hand():
    # Groups of 10, 4 and 1 rows (as above), budget 9: shares 6.0, 2.4, 0.6 -> floors 6, 2, 0,
    # the one left to the largest remainder (C, 0.6).
    assert phase1.group_budget([10, 4, 1], 9, "proportional").tolist() == [6, 2, 1]
    assert phase1.group_budget([10, 4, 1], 9, "balanced").tolist() == [4, 4, 1]
    assert phase1.group_budget([10, 4, 1], 99, "proportional").tolist() == [10, 4, 1]
    y = np.zeros((15, 3), np.uint8)
    y[10:14, 0] = 1
    y[14] = 1
    scores = np.concatenate([SCORES, [0.3, 0.2, 0.1, 0.4], [0.5]])
    picked = phase1.select_boundary(scores, y, 9, 0.9, split="proportional")
    assert np.bincount(phase1.label_groups(y)[picked], minlength=8)[[0, 1, 7]].tolist() == [6, 2, 1]
    with pytest.raises(ValueError, match="group_split"):
        phase1.group_budget([10, 4, 1], 9, "even")


def test_retain_top_by_hand():
    alpha = np.array([0.3, -1.0, 2.0, 0.3, 5.0])
    assert phase1.retain_top(alpha, 2).tolist() == [2, 4]
    assert phase1.retain_top(alpha, 3).tolist() == [0, 2, 4]  # tie at 0.3: the lower index
    assert phase1.retain_top(alpha, 9).tolist() == [0, 1, 2, 3, 4]


def test_mix_labels_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [-np.log(9.0), 2.0]], np.float32)  # p .5 .75 .1
    y = np.array([[1, 0], [1, 1]], np.float32)
    np.testing.assert_array_equal(phase1.mix_labels(logits, y, 0.0), logits)
    # (1 - 0.5) p + 0.5 y: 0.75, 0.375, 0.55; logits log(3), log(0.6), log(11/9)
    mixed = phase1.mix_labels(logits, y, 0.5)
    np.testing.assert_allclose(mixed[0], [np.log(3.0), np.log(0.6)], rtol=1e-6)
    np.testing.assert_allclose(mixed[1, 0], np.log(11 / 9), rtol=1e-5)
    assert mixed[1, 1] > logits[1, 1]  # a positive's label only moves up
    assert np.isfinite(phase1.mix_labels(np.float32([[60.0]]), np.float32([[1.0]]), 0.9)).all()
    with pytest.raises(ValueError, match="label mix"):
        phase1.mix_labels(logits, y, 1.0)


def test_budget():
    assert phase1.budget(6000, 0.05) == 300
    assert phase1.budget(10, 0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        phase1.budget(10, 0.0)


# ------------------------------------------------------------------ on the tiny stream


@pytest.fixture(scope="module")
def teacher(tiny_store):
    """A tiny DCN teacher at its initialisation, with the embedding table scaled up."""
    cfg = load_config("synthetic", "tiny")
    model = build_model(cfg.model, tiny_store.feature_map)
    params, state = model.init(jax.random.key(3))
    # Scale the embedding table to the size of a trained one: gradients and scores are O(1).
    params["embed"] = jax.tree.map(lambda a: a * 1e3, params["embed"])
    return model, create_train_state(params, state, optax.sgd(0.1))


def test_score_and_convert_match_direct_computation(tiny_store, teacher):
    model, ts = teacher
    stage = tiny_store.stage("stage_1")
    logits, scores = phase1.score_stage(model, ts.params, ts.model_state, stage, 1000)
    x, y = np.asarray(stage.x_NxF), np.asarray(stage.y_NxK)
    direct = model.apply(ts.params, ts.model_state, jnp.asarray(x), train=False)[0]
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, influence.el2n(direct, jnp.asarray(y)), rtol=1e-5, atol=1e-6)
    idx = np.array([5, 0, 17, 4000, 5999])
    mem = phase1.to_memory(
        model, ts.params, ts.model_state, x[idx], origin=2, rows_N=idx, batch_size=2
    )
    assert len(mem) == 5
    np.testing.assert_allclose(mem.logits_NxK, direct[idx], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mem.e_NxFxD, model.embed(ts.params["embed"], jnp.asarray(x[idx])))
    assert mem.origin_N.tolist() == [2] * 5 and mem.row_N.tolist() == idx.tolist()
    mixed = phase1.to_memory(
        model, ts.params, ts.model_state, x[idx], origin=2, y_NxK=y[idx], label_mix=0.3
    )
    np.testing.assert_allclose(
        mixed.logits_NxK, phase1.mix_labels(direct[idx], y[idx], 0.3), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(mixed.e_NxFxD, mem.e_NxFxD)
    with pytest.raises(ValueError, match="hard labels"):
        phase1.to_memory(model, ts.params, ts.model_state, x[idx], origin=2, label_mix=0.3)


def test_boundary_memory_and_fusion(tiny_store, teacher, tmp_path):
    model, ts = teacher
    s1, s2 = tiny_store.stage("stage_1"), tiny_store.stage("stage_2")
    mem1, info1 = phase1.boundary_memory(
        model, ts, s1, 1, None, ratio=0.01, percentile=0.9, batch_size=1000
    )
    _, scores = phase1.score_stage(model, ts.params, ts.model_state, s1, 1000)
    expected = phase1.select_boundary(scores, np.asarray(s1.y_NxK), 60, 0.9)
    assert info1["n_t"] == 60 and info1["retained"] == 0
    assert np.asarray(mem1.row_N).tolist() == expected.tolist()
    assert set(np.asarray(mem1.origin_N).tolist()) == {1}

    # Stage 2 with fusion: 60 new rows, then the 60 old rows of largest alpha, where alpha is the
    # explicit sum over the new samples of pairwise influences A(x_i, z).
    old = mem1.replace(logits_NxK=mem1.logits_NxK + 0.5)  # as if refined: non-zero gradients
    mem2, info2 = phase1.boundary_memory(
        model, ts, s2, 2, old, ratio=0.005, percentile=0.9, batch_size=1000, chunk_size=16
    )
    assert info2["retained"] == 30 and len(mem2) == 60
    new_rows = np.asarray(mem2.row_N[:30])
    targets = {
        "e": mem2.e_NxFxD[:30],
        "y": jnp.asarray(np.asarray(s2.y_NxK)[new_rows], jnp.float32),
    }
    loss_fn = influence.dense_loss(model, ts.model_state)
    a = influence.pairwise(loss_fn, loss_fn, ts.params["dense"], old.batch(), targets)
    alpha = np.asarray(a).sum(axis=1)
    keep = np.sort(np.argsort(-alpha)[:30])
    assert np.asarray(mem2.row_N[30:]).tolist() == np.asarray(old.row_N)[keep].tolist()
    np.testing.assert_array_equal(mem2.e_NxFxD[30:], old.e_NxFxD[keep])
    assert set(np.asarray(mem2.origin_N).tolist()) == {1, 2}
    # Without fusion (the ablation's plain variant) only the new rows remain.
    mem2_plain, _ = phase1.boundary_memory(
        model, ts, s2, 2, old, ratio=0.005, percentile=0.9, fusion=False, batch_size=1000
    )
    assert len(mem2_plain) == 30

    # Orbax round trip, shapes read from the checkpoint.
    path = str(tmp_path / "memory")
    memory_lib.save(path, mem2)
    back = memory_lib.load(path)
    for a_, b_ in zip(jax.tree.leaves(back), jax.tree.leaves(mem2), strict=True):
        np.testing.assert_array_equal(a_, b_)
    with pytest.raises(FileNotFoundError):
        memory_lib.load(str(tmp_path / "missing"))


def test_reanchor_moves_carried_rows_into_the_new_teachers_space(tiny_store, teacher):
    model, ts = teacher
    stage = tiny_store.stage("stage_1")
    x = np.asarray(stage.x_NxF)
    idx = np.array([9, 3, 120, 7])
    old_ts = ts
    # phi_t: another table and dense network, so every embedding and logit changes.
    new_ts = ts.replace(params=jax.tree.map(lambda a: a * 1.5 + 0.01, ts.params))
    mem = phase1.to_memory(model, old_ts.params, old_ts.model_state, x[idx], origin=1, rows_N=idx)
    delta_e, delta_l = 0.01 * jnp.ones_like(mem.e_NxFxD), 0.2 * jnp.ones_like(mem.logits_NxK)
    refined = mem.replace(e_NxFxD=mem.e_NxFxD + delta_e, logits_NxK=mem.logits_NxK + delta_l)
    # A row of unknown origin (row -1) is carried as it is.
    unknown = memory_lib.new(jnp.ones((1, *mem.e_NxFxD.shape[1:])), jnp.zeros((1, 3)), 1)
    carried = memory_lib.concat(refined, unknown)
    rows_of = lambda origin, rows: np.asarray(tiny_store.stage(f"stage_{origin}").x_NxF)[rows]  # noqa: E731
    fresh = phase1.to_memory(model, new_ts.params, new_ts.model_state, x[idx], origin=1)

    out = phase1.reanchor(model, new_ts, old_ts, carried, rows_of, "replace", batch_size=3)
    np.testing.assert_allclose(out.e_NxFxD[:4], fresh.e_NxFxD, rtol=1e-6)
    np.testing.assert_allclose(out.logits_NxK[:4], fresh.logits_NxK, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.e_NxFxD[4:], unknown.e_NxFxD)
    assert out.row_N.tolist() == [*idx.tolist(), -1]

    out = phase1.reanchor(model, new_ts, old_ts, carried, rows_of, "offsets", batch_size=3)
    np.testing.assert_allclose(out.e_NxFxD[:4], fresh.e_NxFxD + delta_e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logits_NxK[:4], fresh.logits_NxK + delta_l, rtol=1e-5, atol=1e-4)
    assert phase1.reanchor(model, new_ts, old_ts, carried, rows_of, "off") is carried
    with pytest.raises(ValueError, match="reanchor"):
        phase1.reanchor(model, new_ts, old_ts, carried, rows_of, "sideways")

    # Through Algorithm 1: the retained rows are the re-anchored ones.
    mem2, info = phase1.boundary_memory(
        model,
        new_ts,
        tiny_store.stage("stage_2"),
        2,
        refined,
        ratio=0.005,
        percentile=0.5,
        batch_size=1000,
        retain=4,
        reanchor_mode="replace",
        rows_of=rows_of,
    )
    assert info["reanchored"] == 4 and len(mem2) == 34
    order = np.argsort(np.asarray(mem2.row_N[30:]))
    np.testing.assert_allclose(
        np.asarray(mem2.e_NxFxD[30:])[order], np.asarray(fresh.e_NxFxD)[np.argsort(idx)], rtol=1e-6
    )


def test_release_free_heap_is_a_no_op_without_malloc_trim(monkeypatch):
    phase1.release_free_heap()  # glibc: pages back to the OS, nothing else changes
    calls = []
    monkeypatch.setattr(phase1, "_malloc_trim", lambda: None)  # macOS, musl: no malloc_trim
    phase1.release_free_heap()
    monkeypatch.setattr(phase1, "_malloc_trim", lambda: calls.append)
    phase1.release_free_heap()
    assert calls == [0]


def test_random_pick_keeps_one_row_per_range_and_varies_with_the_seed():
    """strata 0 with a pick generator: still one window per rank range (same ranges, same
    counts, disjoint, ascending), at a random place in it; another seed picks other rows, the
    same seed the same ones; strata 1 (one percentile window) ignores the generator."""
    n, k = 1000, 37
    middle = phase1.rank_windows(n, k, 0.5, 0)
    edges = [(i * n) // k for i in range(k + 1)]
    for seed in (0, 1):
        picked = phase1.rank_windows(n, k, 0.5, 0, phase1.pick_rng(seed, 3))
        assert len(picked) == k
        for (a, b), lo, hi in zip(picked, edges[:-1], edges[1:], strict=True):
            assert lo <= a and b <= hi and b - a == 1
    one = phase1.rank_windows(n, k, 0.5, 0, phase1.pick_rng(0, 3))
    assert one == phase1.rank_windows(n, k, 0.5, 0, phase1.pick_rng(0, 3))
    assert one != phase1.rank_windows(n, k, 0.5, 0, phase1.pick_rng(1, 3)) != middle
    assert phase1.rank_windows(n, k, 0.5, 1, phase1.pick_rng(0, 3)) == phase1.rank_windows(
        n, k, 0.5, 1
    )
    assert phase1.pick_rng(None, 3) is None
