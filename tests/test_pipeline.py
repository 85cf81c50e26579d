"""The reference model and main: quality, checkpoints, resumption, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from diet_jax import io_utils, pipeline
from diet_jax import results as results_lib
from diet_jax.results import METHODS
from diet_jax.train.reference import checkpoint_dir, teacher_root, train_reference
from tests.conftest import ROOT, load_config


def _strict(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def test_results_json_keeps_the_contract(tiny_run):
    workdir, res = tiny_run
    path = os.path.join(workdir, "results.json")
    # Strict JSON, as jq or a browser parses it: no NaN / Infinity constants.
    on_disk = json.loads(open(path).read(), parse_constant=_strict)
    assert on_disk == json.loads(io_utils.dumps(res))
    # A ratio with no historical phase is null on disk and NaN again through results.read.
    assert on_disk["fidelity"]["cold_start"]["cost_ratio_historical"] is None
    back = results_lib.read(path)
    assert np.isnan(back["fidelity"]["cold_start"]["cost_ratio_historical"])
    assert back["results"] == on_disk["results"]  # every finite value as it was
    assert {"dataset", "ratio", "devices", "stages", "results", "fidelity", "timings"} <= set(
        on_disk
    )
    assert on_disk["dataset"] == "synthetic" and on_disk["devices"] >= 1
    assert [s["role"] for s in on_disk["stages"]][-3:] == ["subsequent", "validation", "test"]
    for r in on_disk["results"]:
        assert r["method"] in METHODS
        assert {
            "method",
            "model",
            "auc",
            "logloss",
            "per_task",
            "train_seconds",
            "train_samples",
        } <= set(r)
        assert set(r["per_task"]) == {"click", "like", "buy"}
    ref = [r for r in on_disk["results"] if r["method"] == "reference"]
    assert len(ref) == 1 and ref[0]["model"] == "dcn"
    # Clearly better than chance, and no better than the known optimum.
    assert 0.6 < ref[0]["auc"] < on_disk["oracle"]["test"]["auc"]
    assert os.path.exists(os.path.join(workdir, "config.json"))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    lines = [json.loads(line, parse_constant=_strict) for line in open(metrics_path)]
    assert any(line["phase"] == "teacher_stage" for line in lines)


def test_stage_checkpoints_restore_bit_identical_parameters(tmp_path, tiny_config, tiny_store):
    workdir = str(tmp_path)
    run = train_reference(tiny_config, tiny_store, workdir)
    final = jax.tree.map(np.asarray, run.final.params)
    assert run.restored == [] and len(run.stage_names) == 3
    assert all(
        os.path.isdir(checkpoint_dir(teacher_root(tiny_config, workdir), t)) for t in (1, 2, 3)
    )
    again = train_reference(tiny_config, tiny_store, workdir)
    assert again.restored == run.stage_names and again.train_seconds == 0.0
    jax.tree.map(np.testing.assert_array_equal, final, jax.tree.map(np.asarray, again.final.params))
    # Stages differ from each other: each checkpoint is its own stage's state.
    s1 = again.stage_state(1).params["dense"]
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, s1, again.final.params["dense"])))


def test_rerun_of_pipeline_skips_finished_stages(tiny_run):
    workdir, first = tiny_run
    second = pipeline.run(load_config("synthetic", "tiny"), workdir)
    assert second["timings"]["teacher_restored_stages"] == ["stage_1", "stage_2", "stage_3"]
    ref = lambda res: next(r for r in res["results"] if r["method"] == "reference")  # noqa: E731
    assert ref(second)["auc"] == ref(first)["auc"]


def test_cli_overrides_reach_the_run(tmp_path):
    """--config.* overrides reach config.json and the run. A bad key or value is tests/test_cli.py's
    (one line on stderr, before any work) and tests/test_config.py's (every check)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [
        sys.executable,
        "-m",
        "diet_jax.main",
        "--config=configs/synthetic.py:tiny",
        f"--workdir={tmp_path}",
    ]
    ok = subprocess.run(
        # Candidates are covered by the shared tiny run; one keeps this CLI check short.
        base
        + [
            "--config.train.log_every=7",
            "--config.data.stage_rows=1024",
            "--config.evaluate.models=('dcn',)",
            "--config.evaluate.methods=('warmup_start',)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["train"]["log_every"] == 7
    res = json.load(open(tmp_path / "results.json"))
    assert res["stages"][0]["rows"] == 1024
    assert {(r["method"], r["model"]) for r in res["results"]} == {
        ("reference", "dcn"),
        ("warmup_start", "dcn"),
    }


def test_json_files_are_strict_and_read_back_as_written(tmp_path):
    """Non-finite floats (Python's, numpy's, inside lists and dicts) are written as null; numpy
    arrays and scalars as Python values; results.read turns every null back into NaN."""
    res = {
        "results": [{"auc": np.float32(0.75), "per_epoch": np.array([0.5, np.nan, -np.inf])}],
        "fidelity": {"cold_start": {"cost_ratio_historical": float("nan"), "n": np.int64(3)}},
        "timings": {"total_seconds": float("inf")},
        "label": "NaN",  # a string stays a string
    }
    results_lib.save(str(tmp_path), res)
    text = (tmp_path / "results.json").read_text()
    on_disk = json.loads(text, parse_constant=_strict)
    assert on_disk["results"][0] == {"auc": 0.75, "per_epoch": [0.5, None, None]}
    assert on_disk["fidelity"]["cold_start"] == {"cost_ratio_historical": None, "n": 3}
    assert on_disk["timings"]["total_seconds"] is None and on_disk["label"] == "NaN"
    back = results_lib.load_or_new(str(tmp_path))
    assert back["results"][0]["per_epoch"][0] == 0.5
    assert np.isnan(back["results"][0]["per_epoch"][1:]).all()
    assert np.isnan(back["fidelity"]["cold_start"]["cost_ratio_historical"])
    writer = io_utils.MetricsWriter(str(tmp_path / "w"))
    writer.write(phase="x", loss=np.float32("nan"))
    line = open(tmp_path / "w" / "metrics.jsonl").read()
    assert json.loads(line, parse_constant=_strict) == {"phase": "x", "loss": None}


def test_enable_compilation_cache_keeps_every_program(monkeypatch, tmp_path):
    """main's cache: the folder from $DIET_JAX_CACHE and no size or time floor (JAX's defaults
    drop programs that compile in under a second, most of a candidate's)."""
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    monkeypatch.setenv("DIET_JAX_CACHE", str(tmp_path))
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        assert io_utils.enable_compilation_cache() == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
