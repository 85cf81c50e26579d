"""The synthetic stream and the stage store."""

import numpy as np
import pytest

from diet_jax.data import loader, synthetic
from diet_jax.data.store import StageStore, StoreWriter


def test_generator_is_deterministic_for_a_seed(tmp_path, tiny_config, tiny_store):
    other = str(tmp_path / "again")
    synthetic.generate(tiny_config.data, other, progress=False)
    again = StageStore(other)
    for info in tiny_store.feature_map.stages:
        a, b = tiny_store.stage(info.name), again.stage(info.name)
        np.testing.assert_array_equal(a.x_NxF, b.x_NxF)
        np.testing.assert_array_equal(a.y_NxK, b.y_NxK)
    assert again.feature_map == tiny_store.feature_map


def test_another_seed_gives_another_stream(tmp_path, tiny_config, tiny_store):
    tiny_config.data.seed = 1
    tiny_config.data.test_rows = 500
    synthetic.generate(tiny_config.data, str(tmp_path / "s1"), progress=False)
    x0 = np.asarray(tiny_store.stage("stage_1").x_NxF)
    x1 = np.asarray(StageStore(str(tmp_path / "s1")).stage("stage_1").x_NxF)
    assert (x0 != x1).mean() > 0.5


def test_stages_roles_rows_and_positive_rates(tiny_config, tiny_store):
    fmap = tiny_store.feature_map
    c = tiny_config.data
    assert [s.role for s in fmap.stages] == ["historical"] * c.num_historical_stages + [
        "subsequent",
        "validation",
        "test",
    ]
    assert [s.rows for s in fmap.stages_with_role("historical")] == [
        c.stage_rows
    ] * c.num_historical_stages
    y = np.asarray(tiny_store.stage("stage_1").y_NxK, dtype=np.float64)
    np.testing.assert_allclose(y.mean(0), c.positive_rates, rtol=0.25)
    # Cascade: like and buy only after a click.
    assert not (y[:, 1:] > y[:, :1]).any()
    x = np.asarray(tiny_store.stage("stage_1").x_NxF)
    assert x.dtype == np.int32 and (x >= 0).all() and (x < np.asarray(fmap.vocab_sizes)).all()


def test_stages_differ_in_distribution(tiny_store):
    """Popularity shift: the most frequent items of stage 1 and the test day differ."""
    item = 1

    def top_ids(name, k=20):
        counts = np.bincount(np.asarray(tiny_store.stage(name).x_NxF)[:, item], minlength=500)
        return set(np.argsort(-counts)[:k])

    assert len(top_ids("stage_1") & top_ids("stage_2")) < 20
    assert (
        len(top_ids("stage_1") & top_ids("test")) < len(top_ids("stage_1") & top_ids("stage_2")) + 5
    )
    # Preference shift: the true click probability of the same id moves between stages.
    gaps = []
    for field in (0, 1):
        x1 = np.asarray(tiny_store.stage("stage_1").x_NxF)[:, field]
        x3 = np.asarray(tiny_store.stage("stage_3").x_NxF)[:, field]
        p1 = np.asarray(tiny_store.stage("stage_1").extra["p_true"])[:, 0]
        p3 = np.asarray(tiny_store.stage("stage_3").extra["p_true"])[:, 0]
        common = np.intersect1d(np.argsort(-np.bincount(x1))[:5], np.argsort(-np.bincount(x3))[:5])
        gaps += [abs(p1[x1 == i].mean() - p3[x3 == i].mean()) for i in common]
    assert max(gaps) > 0.02


def test_oracle_auc_is_recorded_and_beats_chance(tiny_store):
    oracle = tiny_store.feature_map.extra["oracle"]
    assert set(oracle) == {"validation", "test"}
    assert oracle["test"]["auc"] > 0.7


def test_store_round_trip_and_atomic_failure(tmp_path):
    root = str(tmp_path / "store")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (7, 2)).astype(np.int32)
    y = rng.integers(0, 2, (7, 3)).astype(np.uint8)
    with StoreWriter(root, "toy", ["a", "b"], [5, 5], ["t1", "t2", "t3"]) as w:
        arrays = w.new_stage("s1", "historical", 7)
        arrays["x"][:], arrays["y"][:] = x, y
        w.finish()
    store = StageStore(root)
    np.testing.assert_array_equal(store.stage("s1").x_NxF, x)
    np.testing.assert_array_equal(store.stage("s1").y_NxK, y)
    assert store.feature_map.vocab_sizes == (5, 5)

    bad = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"row 3: id 9 of field 'b'"):
        with StoreWriter(bad, "toy", ["a", "b"], [5, 5], ["t"]) as w:
            arrays = w.new_stage("s1", "historical", 5)
            arrays["x"][:] = 0
            arrays["x"][3, 1] = 9
            w.finish()
    assert not StageStore.exists(bad)
    assert not list(tmp_path.glob("bad*"))  # no half-written store, no temp folder left


def test_loader_batches_are_deterministic_and_cover_the_stage(tiny_store):
    stage = tiny_store.stage("validation")
    ds = loader.batch_dataset(stage, 512, shuffle=True, seed=3, epoch=1, drop_remainder=False)
    batches = list(loader.iterate(ds))
    again = list(
        loader.iterate(
            loader.batch_dataset(stage, 512, shuffle=True, seed=3, epoch=1, drop_remainder=False)
        )
    )
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    other_epoch = next(
        loader.iterate(loader.batch_dataset(stage, 512, shuffle=True, seed=3, epoch=2))
    )
    assert not np.array_equal(batches[0]["x"], other_epoch["x"])
    assert all(b["x"].shape == (512, stage.x_NxF.shape[1]) for b in batches)
    w = np.concatenate([b["w"] for b in batches])
    assert w.sum() == len(stage) and len(batches) == -(-len(stage) // 512)
    # Every real row appears exactly once (padding rows have weight 0).
    rows = np.concatenate([b["x"][b["w"] > 0] for b in batches])
    key = lambda a: np.sort(a.view([("", a.dtype)] * a.shape[1]).ravel())  # noqa: E731
    np.testing.assert_array_equal(
        key(np.ascontiguousarray(rows)), key(np.ascontiguousarray(stage.x_NxF))
    )
    dropped = list(
        loader.iterate(loader.batch_dataset(stage, 512, shuffle=False, drop_remainder=True))
    )
    assert len(dropped) == len(stage) // 512


def test_returning_cohort_skips_the_subsequent_block(tiny_config, tiny_store):
    """History matters: cohort ids occur in history, never in the subsequent block, and come
    back on the test day in at least the configured share of rows."""
    c = tiny_config.data
    cohort = synthetic.returning_cohort(c)
    assert set(cohort) == set(c.history_fields)
    for name, ids in cohort.items():
        f = c.field_names.index(name)
        assert ids.size > 0
        col = {
            s: np.asarray(tiny_store.stage(s).x_NxF)[:, f]
            for s in ("stage_1", "subsequent", "test")
        }
        assert np.isin(col["stage_1"], ids).mean() > 0.02
        assert not np.isin(col["subsequent"], ids).any()
        assert np.isin(col["test"], ids).mean() >= 0.8 * c.cohort_return_share
