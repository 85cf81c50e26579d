"""Resuming and rerunning: fingerprints, the workdir lock, non-finite values, broken storage,
and crash-anywhere resume (experiments/chaos_resume.py)."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diet_jax import checkpoint, lock, pipeline
from diet_jax import fingerprint as fp_lib
from diet_jax.data.store import StageStore
from diet_jax.errors import UserError
from diet_jax.models import build_model
from diet_jax.train import loop
from diet_jax.train.reference import checkpoint_dir, train_reference
from diet_jax.train.steps import make_trainer
from tests.conftest import ROOT, load_config


# ------------------------------------------------------------------ fingerprints (pure)
def test_fingerprint_covers_sections_by_prefix_and_skips_excluded_keys(tiny_config):
    cfg = tiny_config
    store = fp_lib.fingerprint(cfg, "store")
    assert "data.seed" in store["keys"] and "data.stage_rows" in store["keys"]
    assert "data.store_dir" not in store["keys"] and "ratio" not in store["keys"]
    cfg.data.some_new_key = 3  # a key another module adds to the section is covered at once
    assert fp_lib.fingerprint(cfg, "store")["fingerprint"] != store["fingerprint"]
    teacher = fp_lib.fingerprint(cfg, "teacher", exclude=fp_lib.other_backbones("dcn"))
    assert (
        "model.dcn.hidden" in teacher["keys"] and "model.wukong.num_layers" not in teacher["keys"]
    )
    for excluded in ("train.log_every", "progress", "evaluate.rerun", "train.nan_policy"):
        assert excluded not in fp_lib.fingerprint(cfg, "candidate")["keys"]
    assert fp_lib.matches("evaluate.kmeans_iters", "evaluate.kmeans_*")
    assert not fp_lib.matches("database", "data")
    before = fp_lib.fingerprint(cfg, "phase1", {"teacher": "a"})
    cfg.ratio = 0.1
    after = fp_lib.fingerprint(cfg, "phase1", {"teacher": "b"})
    assert fp_lib.changes(before, after) == ["ratio: 0.05 -> 0.1", "input teacher"]
    # A key added later, at its neutral value, leaves the record as it was before the key
    # existed (an upgrade keeps old artifacts); any other value is a change.
    cfg.distill.strata = 1  # its neutral value (the behaviour before the key); the default is 0
    phase1 = fp_lib.fingerprint(cfg, "phase1")
    with cfg.unlocked():
        del cfg.distill["label_mix"]
        del cfg.distill["strata"]
    assert fp_lib.fingerprint(cfg, "phase1") == phase1
    cfg.distill.label_mix = 0.25
    assert fp_lib.changes(phase1, fp_lib.fingerprint(cfg, "phase1")) == [
        "distill.label_mix: '<unset>' -> 0.25"
    ]
    with cfg.unlocked():  # a run made before the key, rerun under the default: phase 1 again
        cfg.distill.strata = 0
    assert "distill.strata: '<unset>' -> 0" in fp_lib.changes(
        phase1, fp_lib.fingerprint(cfg, "phase1")
    )
    # The rate grid's pruning, off (the default), leaves candidates' records as before the keys.
    cfg.evaluate.lr_prune_epochs, cfg.evaluate.lr_prune_keep = 0, 3
    cand = fp_lib.fingerprint(cfg, "candidate")
    with cfg.unlocked():
        del cfg.evaluate["lr_prune_epochs"]
        del cfg.evaluate["lr_prune_keep"]
    assert fp_lib.fingerprint(cfg, "candidate") == cand
    with cfg.unlocked():
        cfg.evaluate.lr_prune_epochs, cfg.evaluate.lr_prune_keep = 2, 3
    assert fp_lib.changes(cand, fp_lib.fingerprint(cfg, "candidate")) == [
        "evaluate.lr_prune_epochs: '<unset>' -> 2"
    ]
    cfg.evaluate.learning_rate = 1.0  # evaluation keys: no effect on the teacher or the memory
    assert (
        fp_lib.fingerprint(cfg, "teacher")["fingerprint"]
        == fp_lib.fingerprint(tiny_config, "teacher")["fingerprint"]
    )


# ------------------------------------------------------------------ reruns with changed keys
def _copy(tiny_run, tmp_path) -> str:
    """A private copy of the shared tiny run's workdir (file times kept)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], workdir, copy_function=shutil.copy2)
    return workdir


def _mtimes(root: str) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(root)
        for f in fs
    }


def _results(workdir: str) -> dict:
    res = json.load(open(os.path.join(workdir, "results.json")))
    return {(r["method"], r["model"]): r for r in res["results"]}


def test_every_pool_candidate_is_fingerprinted_and_kept_by_a_rerun(tiny_run):
    """The pool's variants (dcn_narrow in :tiny), not only the base settings, carry a
    fingerprint: an unchanged rerun keeps every entry instead of recomputing the variants."""
    workdir, _ = tiny_run
    res = json.load(open(os.path.join(workdir, "results.json")))
    config = load_config("synthetic", "tiny")
    assert {r["model"] for r in res["results"]} >= {"dcn", "dcn_narrow", "wukong"}
    assert all("fingerprint" in r for r in res["results"])
    store = StageStore(os.path.join(workdir, "data"))
    records = pipeline._records(config, store)
    n = len(res["results"])
    assert not pipeline._drop_stale_results(res, records) and len(res["results"]) == n
    # A variant's record follows its own backbone's section and ignores the others'.
    narrow = records[("diet", "dcn_narrow")]
    assert "model.dcn.hidden" in narrow["keys"] and "model.wukong.num_layers" not in narrow["keys"]
    config.model.wukong.num_layers += 1
    assert pipeline._records(config, store)[("diet", "dcn_narrow")] == narrow


def test_changed_ratio_rebuilds_phase1_onwards_only(tiny_run, tmp_path, caplog):
    workdir = _copy(tiny_run, tmp_path)
    store_t, teacher_t = _mtimes(f"{workdir}/data"), _mtimes(f"{workdir}/teacher")
    distill_t = _mtimes(f"{workdir}/distill")
    before = _results(workdir)
    cfg = load_config()
    cfg.ratio = 0.04
    cfg.evaluate.methods, cfg.evaluate.models = ("warmup_start", "diet"), ("dcn",)
    with caplog.at_level(logging.INFO):
        res = pipeline.run(cfg, workdir)
    log = caplog.text
    assert _mtimes(f"{workdir}/data") == store_t and _mtimes(f"{workdir}/teacher") == teacher_t
    assert "using the stage store" in log and "teacher: restored stage_3" in log
    assert "phase-1 memory at" in log and "changed: ratio: 0.05 -> 0.04" in log
    assert all(_mtimes(f"{workdir}/distill").get(k) != v for k, v in distill_t.items())
    assert res["ratio"] == 0.04
    after = _results(workdir)
    # Entries that do not depend on the ratio stay; those that do were dropped or recomputed.
    for key in [("full_data", "dcn"), ("warmup_start", "dcn"), ("cold_start", "wukong")]:
        assert after[key] == before[key]
    assert after[("diet", "dcn")]["auc"] != before[("diet", "dcn")]["auc"]
    assert ("random", "dcn") not in after and ("diet", "wukong") not in after
    assert "dropping diet/wukong" in log


def test_changed_data_rebuilds_everything(tiny_run, tmp_path, caplog):
    workdir = _copy(tiny_run, tmp_path)
    store_t, teacher_t = _mtimes(f"{workdir}/data"), _mtimes(f"{workdir}/teacher")
    x_before = np.load(f"{workdir}/data/stages/stage_1/x.npy")
    cfg = load_config()
    cfg.data.seed = 1
    cfg.evaluate.methods = ()
    with caplog.at_level(logging.INFO):
        res = pipeline.run(cfg, workdir)
    log = caplog.text
    assert "stage store at" in log and "changed: data.seed: 0 -> 1" in log
    assert not np.array_equal(np.load(f"{workdir}/data/stages/stage_1/x.npy"), x_before)
    assert all(_mtimes(f"{workdir}/teacher").get(k) != v for k, v in teacher_t.items())
    assert all(_mtimes(f"{workdir}/data").get(k) != v for k, v in store_t.items())
    assert "teacher stage_1 at" in log and "input store" in log
    assert res["timings"]["teacher_restored_stages"] == []
    assert res["timings"]["distill_restored_stages"] == []
    # Only the new reference is left in results.json: nothing from the other stream.
    assert [(r["method"], r["model"]) for r in res["results"]] == [("reference", "dcn")]


# ------------------------------------------------------------------ one run per workdir
def test_second_concurrent_run_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = os.path.join(workdir, lock.FILENAME)
        with open(path, "w") as f:
            json.dump({"pid": owner.pid, "host": os.uname().nodename, "started": "now"}, f)
        env = {**os.environ, "PYTHONPATH": ROOT}
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "diet_jax.main",
                "--config=configs/synthetic.py:tiny",
                f"--workdir={workdir}",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 2, cli.stderr[-2000:]
        assert f"in use by another run: pid {owner.pid}" in cli.stderr
        assert not os.path.exists(os.path.join(workdir, "data"))  # stopped before any work
    finally:
        owner.kill()
        owner.wait()
    # The owner is gone: its lock is stale and taken over, with a warning; released at the end.
    with caplog.at_level(logging.WARNING):
        taken = lock.acquire(workdir)
    assert "stale lock" in caplog.text and json.load(open(taken))["pid"] == os.getpid()
    with pytest.raises(UserError, match="in use by another run"):  # no second holder, even us
        with open(taken, "w") as f:
            json.dump({"pid": 1, "host": os.uname().nodename}, f)  # pid 1 is alive
        lock.acquire(workdir)
    os.remove(taken)


def test_storage_errors_stop_naming_the_path(tmp_path, monkeypatch):
    def full(workdir):
        raise OSError(errno.ENOSPC, "No space left on device", f"{workdir}/results.json")

    monkeypatch.setattr(pipeline.results_lib, "load_or_new", full)
    with pytest.raises(UserError, match=r"Cannot write .*/results.json: No space left"):
        pipeline.run(load_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / lock.FILENAME)  # the lock is released
    # Orbax (TensorStore) reports a full disk only as text: recognised, raised as ENOSPC.
    message = 'RESOURCE_EXHAUSTED: Error writing local file "x": No space left on device'
    assert checkpoint._storage_errno(message) == errno.ENOSPC
    assert checkpoint._storage_errno("shape mismatch") is None


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("optimizer", ["dense_adam", "rowwise_adagrad"])
def test_skip_batch_leaves_the_state_unchanged(tiny_store, tiny_config, optimizer):
    cfg = tiny_config.train
    cfg.embedding_optimizer, cfg.nan_policy, cfg.inject_nan = optimizer, "skip_batch", "candidate:1"
    model = build_model(tiny_config.model, tiny_store.feature_map, name="dcn")
    trainer = make_trainer(model, cfg)
    state = trainer.init(*model.init(jax.random.key(0)))
    stage = tiny_store.stage("stage_1")
    b0, b1 = [
        {
            k: jnp.asarray(v[i * 64 : (i + 1) * 64])
            for k, v in (("x", stage.x_NxF), ("y", stage.y_NxK))
        }
        | {"w": jnp.ones(64)}
        for i in range(2)
    ]
    state, m0 = trainer.step(state, b0)
    snapshot = jax.tree.map(np.array, state)
    state, m1 = trainer.step(state, b1)  # step 1 is poisoned: skipped
    assert bool(m0["finite"]) and not bool(m1["finite"]) and bool(m1["skipped"])
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves(snapshot.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(snapshot.opt_state), jax.tree.leaves(state.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_injected_nan_stops_the_teacher_and_keeps_the_last_checkpoint(tiny_store, tmp_path):
    cfg = load_config()
    cfg.train.inject_nan = "teacher:30"  # stage 1 has 23 steps: step 7 of stage 2
    workdir = str(tmp_path)
    with pytest.raises(loop.NonFiniteError) as e:
        train_reference(cfg, tiny_store, workdir)
    first = checkpoint_dir(os.path.join(workdir, "teacher"), 1)
    assert (
        f"phase teacher, stage stage_2, step 7: the phase stopped. Last good checkpoint (kept): {first}"
        in str(e.value)
    )
    assert checkpoint.exists(first) and checkpoint.read_stamp(first) is not None
    assert not os.path.exists(checkpoint_dir(os.path.join(workdir, "teacher"), 2))
    cfg.train.inject_nan = ""  # fixed: the rerun continues from the kept stage
    again = train_reference(cfg, tiny_store, workdir)
    assert again.restored == ["stage_1"]


def _fake_outer_step(state, batch, ctx):
    """Stands in for the bi-level step (whose compilation costs a minute here): the memory
    moves by 1 per iteration; the metrics have the real step's keys."""
    del ctx
    new = state.replace(step=state.step + 1, syn=jax.tree.map(lambda a: a + 1.0, state.syn))
    y = batch["y"].astype(jnp.float32)
    return new, {"meta_loss": jnp.mean(y), "grad_norm": jnp.ones(()), "hard_logits": y, "hard_y": y}


@pytest.mark.parametrize("policy", ["stop", "skip_batch"])
def test_injected_nan_in_distillation(tiny_store, tmp_path, policy):
    import optax

    from diet_jax.distill import bilevel, driver
    from diet_jax.distill import memory as memory_lib

    memory = memory_lib.new(np.zeros((8, 8, 4), np.float32), np.zeros((8, 3), np.float32), 1)
    tx = optax.sgd(0.1)
    step = driver._guarded(jax.jit(_fake_outer_step), policy, inject_nan=3)
    kwargs = dict(
        iterations=5,
        batch_size=256,
        seed=0,
        ckpt_dir=str(tmp_path / "ckpt"),
        checkpoint_every=2,
        log_every=1,
        progress=False,
        log_fields={"stage": "stage_1"},
        last_good=str(tmp_path / "init"),
        record={"fingerprint": "fp", "keys": {}, "inputs": {}},
    )
    stage = tiny_store.stage("stage_1")
    state0 = bilevel.init_state(memory, tx, seed=0)
    if policy == "stop":
        with pytest.raises(loop.NonFiniteError) as e:
            driver.refine(step, state0, stage, {}, **kwargs)
        kept = str(tmp_path / "ckpt" / "step_000002")
        assert (
            f"phase distill, stage stage_1, step 3: the phase stopped. Last good checkpoint "
            f"(kept): {kept}" in str(e.value)
        )
        # The last good checkpoint is kept, stamped; none after the NaN.
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000002", "step_000002.stamp.json"]
        assert checkpoint.read_stamp(kept)["fingerprint"] == "fp"
    else:
        state, stats = driver.refine(step, state0, stage, {}, **kwargs)
        assert stats["skipped"] == 1 and int(state.step) == 5
        np.testing.assert_array_equal(state.syn["e"], 4.0)  # five iterations, one skipped


# ------------------------------------------------------------------ broken storage
def test_truncated_checkpoint_is_detected_and_recomputed(tiny_run, tmp_path, caplog):
    workdir = _copy(tiny_run, tmp_path)
    cfg = load_config()
    store = StageStore(os.path.join(workdir, "data"))
    good = train_reference(cfg, store, workdir)
    assert good.restored == ["stage_1", "stage_2", "stage_3"]
    stage2 = checkpoint_dir(os.path.join(workdir, "teacher"), 2)
    files = [os.path.join(d, f) for d, _, fs in os.walk(stage2) for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)  # half a file, as from a crash or a bad disk
    with caplog.at_level(logging.WARNING):
        again = train_reference(cfg, store, workdir)
    assert (
        f"teacher stage_2 at {stage2} is damaged ({os.path.relpath(victim, stage2)} has"
        in caplog.text
    )
    assert again.restored == ["stage_1", "stage_3"]  # stage 2 trained again from stage 1
    for a, b in zip(
        jax.tree.leaves(good.stage_state(2).params),
        jax.tree.leaves(again.stage_state(2).params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A truncated store column: detected by its size and the store rebuilt.
    column = os.path.join(workdir, "data", "stages", "stage_1", "x.npy")
    content = np.load(column)
    with open(column, "r+b") as f:
        f.truncate(1000)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rebuilt = pipeline._prepare(cfg, workdir)
    assert "stage store at" in caplog.text and "stages/stage_1/x.npy has 1000 bytes" in caplog.text
    np.testing.assert_array_equal(rebuilt.stage("stage_1").x_NxF, content)


# ------------------------------------------------------------------ crash-anywhere resume
def test_chaos_resume_survives_kills(tiny_run, tmp_path):
    """Three SIGKILLs at random moments (the longest phases), resumed each time: the same
    results and distilled memory as the shared uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [
            sys.executable,
            "experiments/chaos_resume.py",
            "--kills=3",
            f"--workdir={tmp_path}",
            f"--reference={tiny_run[0]}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "kills survived: 3/3, mismatches: 0" in out.stdout, out.stdout + out.stderr[-3000:]


def test_chaos_kills_land_on_units_that_leave_two_undone():
    """The kill plan anchors each kill of a phase with units on a finished unit that leaves at
    least two of the phase's units to do, whatever the seed (so a short delay cannot outlast an
    attempt that runs faster than the reference); a phase without units waits for seconds."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location(
        "chaos_resume", os.path.join(ROOT, "experiments", "chaos_resume.py")
    )
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    durations = {"data": 5.0, "teacher": 10.0, "distill": 30.0, "candidates": 170.0}
    units = {"teacher": 3, "distill": 3, "candidates": 22}
    for seed in range(50):
        kills = chaos.plan(10, durations, units, random.Random(seed))
        assert len(kills) == 10
        assert [k.phase for k in kills] == sorted((k.phase for k in kills), key=chaos.PHASES.index)
        for phase in ("teacher", "distill", "candidates"):
            mine = [k for k in kills if k.phase == phase]
            assert mine, phase  # at least one kill per phase when N >= 4
            assert sum(k.units for k in mine) <= units[phase] - 2  # the last target
            assert all(0 <= k.units and 0 <= k.delay <= 0.5 for k in mine)
        data = [k for k in kills if k.phase == "data"]
        assert data and all(k.units == 0 and 0.2 <= k.delay <= 0.9 * 5.0 for k in data)
    # With three kills, the three longest phases; the candidates kill's unit varies by seed.
    firsts = {chaos.plan(3, durations, units, random.Random(s))[2].units for s in range(20)}
    assert [k.phase for k in chaos.plan(3, durations, units, random.Random(0))] == [
        "teacher",
        "distill",
        "candidates",
    ]
    assert len(firsts) > 3
