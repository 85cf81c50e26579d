"""The Taobao-format generator through the real reader; chunked selection equals unchunked."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
import pytest
from conftest import load_config

from diet_jax import baselines
from diet_jax.data import raw, synthetic_taobao, taobao
from diet_jax.data.store import StageStore
from diet_jax.distill import phase1
from diet_jax.models import build_model


def _tiny_taobao(tmp_path, **overrides):
    c = load_config("taobao_synth", "tiny")
    c.data.data_dir = str(tmp_path / "raw")
    c.data.synth_rows = 12_000
    for k, v in overrides.items():
        c.data[k] = v
    return c


def test_generated_userbehavior_goes_through_the_taobao_reader(tmp_path):
    c = _tiny_taobao(tmp_path)
    root = str(tmp_path / "store")
    fmap = synthetic_taobao.build(c.data, root, progress=False)
    path = os.path.join(c.data.data_dir, taobao.FILE)
    df = pl.read_csv(path, has_header=False, new_columns=list(taobao.COLUMNS))
    assert df.height == c.data.synth_rows == fmap.extra["rows_read"]
    assert set(df["behavior_type"].unique()) == set(taobao.BEHAVIORS)
    # Brute force: one sample per (user, item, Beijing day) inside the stages; labels = any.
    spans = raw.parse_stages(c.data.stages)
    off = int(c.data.utc_offset_hours * 3600)
    starts = [raw.epoch_seconds(s.start, c.data.utc_offset_hours) for s in spans]
    ends = [raw.epoch_seconds(s.end, c.data.utc_offset_hours) for s in spans]
    stage = raw.assign_stages(df["timestamp"].to_numpy(), starts, ends)
    assert 0 < (stage < 0).sum() < 0.01 * df.height  # a few lines outside every stage, counted
    assert fmap.extra["rows_outside_stages"] == int((stage < 0).sum())
    groups = (
        df.with_columns(stage=pl.Series(stage), day=(pl.col("timestamp") + off) // 86400)
        .filter(pl.col("stage") >= 0)
        .group_by("stage", "user_id", "item_id", "day")
        .agg(*[(pl.col("behavior_type") == t).any().alias(t) for t in taobao.TASKS])
    )
    store = StageStore(root)
    for i, info in enumerate(fmap.stages):
        g = groups.filter(pl.col("stage") == i)
        assert info.rows == g.height > 0
        y = np.asarray(store.stage(info.name).y_NxK)
        np.testing.assert_array_equal(y.sum(0), g.select(taobao.TASKS).sum().to_numpy()[0])
    # Every task has positives, at rates near the real file's (a few percent of groups).
    rates = groups.select(taobao.TASKS).mean().to_numpy()[0]
    assert ((rates > 0.005) & (rates < 0.2)).all(), rates


def test_generated_file_is_reused_or_regenerated_by_its_parameters(tmp_path):
    c = _tiny_taobao(tmp_path, synth_rows=3_000)
    path = synthetic_taobao.ensure_csv(c.data, progress=False)
    first = open(path, "rb").read()
    os.utime(path, (0, 0))
    assert synthetic_taobao.ensure_csv(c.data, progress=False) == path
    assert os.stat(path).st_mtime == 0  # same parameters: not rewritten
    c.data.synth_rows = 3_001
    synthetic_taobao.ensure_csv(c.data, progress=False)
    again = open(path, "rb").read()
    assert again.count(b"\n") == 3_001 and again.startswith(first[:1000])  # same seed, same start


# ------------------------------------------------------------------ streamed selection


def _scores_with_ties(rng, n):
    s = rng.normal(size=n).astype(np.float32)
    s[rng.random(n) < 0.3] = np.float32(0.5)  # a big tie
    s[rng.random(n) < 0.1] = np.float32(-0.0)
    return np.round(s, 2)


@pytest.mark.parametrize("strata", [1, 7, 0])
@pytest.mark.parametrize("split", phase1.GROUP_SPLITS)
@pytest.mark.parametrize("n,q", [(1, 0.9), (37, 0.9), (200, 0.5), (999, 0.0), (5000, 1.0)])
def test_chunked_selections_equal_the_in_memory_ones(n, q, split, strata):
    rng = np.random.default_rng(n)
    rows = 5000
    scores = _scores_with_ties(rng, rows)
    y = (rng.random((rows, 3)) < [0.4, 0.1, 0.03]).astype(np.uint8)
    for pick in (None, 7):  # the middle of each score range, or a seeded random place in it
        want = phase1.select_boundary(scores, y, n, q, split, strata, pick_seed=pick)
        got = phase1.select_boundary_chunked(
            scores, y, n, q, chunk=333, split=split, strata=strata, pick_seed=pick
        )
        np.testing.assert_array_equal(got, want)
        assert got.size == n and np.unique(got).size == n
        np.testing.assert_array_equal(
            phase1.select_percentile_chunked(
                scores, n, q, chunk=777, strata=strata, pick_seed=pick
            ),
            phase1.select_percentile(scores, n, q, strata, pick_seed=pick),
        )


def test_streamed_phase1_scores_and_rows_equal_the_in_memory_ones(
    tmp_path, tiny_config, tiny_store
):
    fmap = tiny_store.feature_map
    model = build_model(tiny_config.model, fmap, name="dcn")
    params, state = model.init(jax.random.key(0))
    stage = tiny_store.stage("stage_1")
    _, want = phase1.score_stage(model, params, state, stage, 1000)
    got = phase1.score_to_memmap(model, params, state, stage, 1000, str(tmp_path / "s.npy"))
    np.testing.assert_array_equal(np.asarray(got), want)
    teacher = type("T", (), {"params": params, "model_state": state})
    idx = phase1.stage_selection(model, teacher, stage, 300, 0.9, grouped=True, batch_size=1000)
    np.testing.assert_array_equal(idx, phase1.select_boundary(want, stage.y_NxK, 300, 0.9))


def test_chunked_kmeans_selection_equals_the_unchunked_one():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (5, 6))
    x = (centers[rng.integers(0, 5, 1000)] + rng.normal(size=(1000, 6))).astype(np.float32)
    c, assign, dist = baselines.kmeans(jnp.asarray(x), jax.random.key(3), k=5, iters=8, chunk=64)
    want = baselines.nearest_to_centroids(np.asarray(assign), np.asarray(dist), 5, 40)
    got = baselines.kmeans_select(
        lambda idx: x[idx],
        1000,
        40,
        k=5,
        iters=8,
        seed=3,
        max_rows=1000,
        chunk=128,
        assign_chunk=64,
    )
    np.testing.assert_array_equal(got, want)
    # A bounded subsample: centroids from 300 rows, every row assigned; n rows, all distinct.
    sub = baselines.kmeans_select(
        lambda idx: x[idx],
        1000,
        40,
        k=5,
        iters=8,
        seed=3,
        max_rows=300,
        chunk=128,
        assign_chunk=64,
    )
    assert sub.size == 40 == np.unique(sub).size and sub.max() < 1000


def test_selection_rows_are_loaded_per_candidate_once_per_saved_memory(tmp_path):
    """run_all keeps saved paths, not rows: a path shared by every seed is read once, its row
    count comes from the metadata alone, and the loaded rows equal the saved ones."""
    from diet_jax.distill import memory as memory_lib
    from diet_jax.evaluate import methods, protocol

    rng = np.random.default_rng(0)
    mem = memory_lib.new(
        rng.normal(size=(7, 3, 2)).astype(np.float32), rng.normal(size=(7, 2)), origin=1
    )
    path = str(tmp_path / "el2n")
    memory_lib.save(path, mem)
    assert memory_lib.rows(path) == 7
    shared = methods._rows_by_seed(dict.fromkeys([0, 1, 2], path))
    assert shared[0] is shared[1] is shared[2]  # one (lazy) load for the three seeds
    assert isinstance(shared[0], protocol.LazyRows) and shared[0].n == 7
    loaded = shared[0].load()
    np.testing.assert_array_equal(np.asarray(loaded["e"]), np.asarray(mem.e_NxFxD))
    np.testing.assert_array_equal(np.asarray(loaded["logits"]), np.asarray(mem.logits_NxK))
    # Random's draws: one lazy object per seed, nothing read yet.
    paths = {s: str(tmp_path / f"random{s}") for s in range(2)}
    for s, p in paths.items():
        memory_lib.save(p, mem.replace(logits_NxK=mem.logits_NxK + s))
    draws = methods._rows_by_seed(paths)
    assert draws[0] is not draws[1] and protocol.rows_count(draws[1]) == 7
    np.testing.assert_allclose(np.asarray(draws[1].load()["logits"]), mem.logits_NxK + 1)
    # DIET's memory (already in memory) passes through without a copy, one dict for its seeds.
    direct = methods._rows_by_seed({0: mem, 1: mem})
    assert direct[0]["e"] is mem.e_NxFxD and direct[0] is direct[1]
    with pytest.raises(FileNotFoundError, match="No memory checkpoint"):
        memory_lib.rows(str(tmp_path / "missing"))
