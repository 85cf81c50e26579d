"""The Taobao-format generator through the real reader; chunked selection equals unchunked."""

import os

import numpy as np
import polars as pl
from conftest import load_config

from diet_jax.data import raw, synthetic_taobao, taobao
from diet_jax.data.store import StageStore


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
