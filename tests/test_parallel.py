"""Scale-out on 4 simulated CPU devices: sharded steps equal single-device ones.

conftest gives the test session 4 CPU devices (`jax_num_cpu_devices`); the end-to-end run and
the two-process run are subprocesses with their own device counts. With fewer than 4 devices in
this session (conftest changed), the in-process checks rerun in a subprocess that has 4.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config
from jax.sharding import PartitionSpec as P

from diet_jax import influence, parallel
from diet_jax.data import loader
from diet_jax.data.store import FeatureMap
from diet_jax.distill import bilevel
from diet_jax.distill import memory as memory_lib
from diet_jax.models import build_model
from diet_jax.train import steps

NDEV = 4
has4 = pytest.mark.skipif(jax.device_count() < NDEV, reason="needs 4 devices in this session")
# 5 + 7 + 4 = 16 table rows: divides over 4 devices, so the table can be row-sharded.
FMAP = FeatureMap("t", ("a", "b", "c"), (5, 7, 4), ("t1", "t2", "t3"), ())
TOL = {"rtol": 2e-5, "atol": 2e-6}  # float32; sharded sums are added in another order


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(NDEV)


@pytest.fixture(scope="module")
def model():
    return build_model(load_config("synthetic", "tiny").model, FMAP)


def _batch(b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(0, v, b) for v in FMAP.vocab_sizes], 1).astype(np.int32)
    w = np.ones(b, np.float32)
    w[-3:] = 0.0  # padding rows, as in a last batch
    return {"x": x, "y": (rng.random((b, 3)) < 0.4).astype(np.uint8), "w": w}


def _close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


def _spec(a) -> P:
    return a.sharding.spec


# ------------------------------------------------------------------ mesh, config, shardings


@has4
def test_mesh_config_and_clear_errors():
    cfg = load_config("synthetic", "tiny")
    assert parallel.mesh_from_config(cfg) is None  # tiny: off unless asked
    cfg.parallel.enabled = True
    m = parallel.mesh_from_config(cfg)
    assert m.axis_names == ("data",) and m.shape["data"] == jax.device_count()
    cfg.parallel.data_axis_size = 2
    assert parallel.mesh_from_config(cfg).shape["data"] == 2
    cfg.train.batch_size = 6
    cfg.parallel.data_axis_size = 4
    with pytest.raises(ValueError, match=r"train.batch_size \(6\) must be divisible by .* \(4"):
        parallel.mesh_from_config(cfg)
    cfg.parallel.data_axis_size = 99
    with pytest.raises(ValueError, match="data_axis_size must lie in"):
        parallel.mesh_from_config(cfg)
    assert parallel.local_rows(None, 8) == (0, 8)  # one process reads every row


@has4
def test_table_and_state_shardings(mesh, model):
    assert parallel.table_spec((16, 8), 4) == P("data")
    assert parallel.table_spec((18, 8), 4) == P(None, "data")  # rows uneven: columns
    assert parallel.table_spec((18, 6), 4) == P()
    for opt in ("dense_adam", "lazy_adam"):
        cfg = load_config("synthetic", "tiny").train
        cfg.embedding_optimizer = opt
        trainer = steps.make_trainer(model, cfg)
        state = trainer.init(*model.init(jax.random.key(0)))
        sh = parallel.state_shardings(state, mesh, shard_embeddings=True)
        sharded = [
            jax.tree_util.keystr(p)
            for p, s in jax.tree_util.tree_leaves_with_path(sh)
            if s.spec != P()
        ]
        # The table and its two Adam moments, nothing of the dense network.
        assert len(sharded) == 3 and all("embed" in p for p in sharded), sharded
        assert all(s.spec == P() for s in jax.tree.leaves(parallel.state_shardings(state, mesh)))


# ------------------------------------------------------------------ train step


@has4
@pytest.mark.parametrize(
    "opt,shard_embeddings", [("dense_adam", False), ("lazy_adam", True), ("dense_adam", True)]
)
def test_sharded_train_step_equals_single_device(mesh, model, opt, shard_embeddings):
    cfg = load_config("synthetic", "tiny").train
    cfg.embedding_optimizer = opt
    trainer = steps.make_trainer(model, cfg)
    params, model_state = model.init(jax.random.key(0))
    # A larger table than the 1e-4 init, so the dense gradients are not trivial.
    params["embed"]["table"] = jax.random.normal(jax.random.key(1), (16, 8))
    batches = [_batch(32, seed) for seed in range(2)]

    ref = trainer.init(*jax.tree.map(jnp.copy, (params, model_state)))
    ref_losses = []
    for b in batches:
        ref, m = trainer.step(ref, jax.device_put(b))
        ref_losses.append(float(m["loss"]))

    state = trainer.init(*jax.tree.map(jnp.copy, (params, model_state)))
    shardings = parallel.state_shardings(state, mesh, shard_embeddings=shard_embeddings)
    state = parallel.put(state, shardings)
    losses = []
    for b in batches:
        sb = parallel.put_batch(b, mesh)
        assert sb["x"].addressable_shards[0].data.shape == (8, 3)  # 32 rows over 4 devices
        state, m = trainer.step(state, sb)
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    _close(state.params, ref.params)
    _close(state.opt_state, ref.opt_state)
    # The step keeps the layout: replicated stays replicated, the sharded table stays sharded.
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    table = state.params["embed"]["table"]
    assert _spec(table) == (P("data") if shard_embeddings else P())


# ------------------------------------------------------------------ influence sums


@has4
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_sharded_influence_sums_equal_single_device(mesh, model, chunk_size):
    params_dense, model_state = model.init_dense(jax.random.key(2))
    loss_fn = influence.dense_loss(model, model_state)
    ks = jax.random.split(jax.random.key(3), 5)
    real = {
        "e": jax.random.normal(ks[0], (32, 3, 8)),
        "y": (jax.random.uniform(ks[1], (32, 3)) < 0.4).astype(jnp.float32),
    }
    syn = {"e": jax.random.normal(ks[2], (24, 3, 8)), "y": jax.random.uniform(ks[3], (24, 3))}
    valid = jnp.arange(24) < 20
    direction = jax.tree.map(lambda a: jax.random.normal(ks[4], a.shape), params_dense)

    @jax.jit
    def sums(params, real, syn, valid, direction):
        return {
            "deficiency": influence.deficiency(
                loss_fn, loss_fn, params, real, syn, valid, chunk_size=chunk_size
            ),
            "responsibility": influence.responsibility(
                loss_fn, loss_fn, params, syn, real, chunk_size=chunk_size
            ),
            "grad_sum": influence.grad_sum(loss_fn, params, real, chunk_size=chunk_size),
            "grad_dot": influence.grad_dot(loss_fn, params, real, direction, chunk_size=chunk_size),
        }

    want = sums(params_dense, real, syn, valid, direction)
    rows = parallel.batch_sharding(mesh)
    got = sums(
        parallel.put_replicated(params_dense, mesh),
        parallel.put(real, rows),
        parallel.put(syn, rows),  # the memory's rows split too: its gradient sum is all-reduced
        parallel.put(valid, rows),
        parallel.put_replicated(direction, mesh),
    )
    assert got["grad_dot"].sharding.device_set == set(mesh.devices.flat)
    _close(got, want)
    # Brute force on one device: the sums are sums of per-sample gradient dot products.
    a_real = influence.pairwise(loss_fn, loss_fn, params_dense, real, syn)  # [32, 24]
    np.testing.assert_allclose(
        got["deficiency"], a_real @ valid.astype(jnp.float32), rtol=1e-4, atol=1e-5
    )


# ------------------------------------------------------------------ outer distillation iteration


@has4
def test_sharded_outer_iteration_equals_single_device(mesh, model):
    cfg = load_config("synthetic", "tiny")
    bcfg = bilevel.BilevelConfig(
        inner_steps=4, window=2, inner_lr=0.05, hard_size=4, active_size=8, chunk_size=16
    )
    tx = bilevel.make_meta_optimizer(cfg.distill)
    outer = bilevel.make_outer_step(model, bcfg, tx)
    params, model_state = model.init(jax.random.key(4))
    params["embed"]["table"] = jax.random.normal(jax.random.key(5), (16, 8))
    teacher = types.SimpleNamespace(params=params, model_state=model_state)
    ks = jax.random.split(jax.random.key(6), 2)
    memory = memory_lib.new(
        jax.random.normal(ks[0], (20, 3, 8)), jax.random.normal(ks[1], (20, 3)), origin=1
    )
    ctx = bilevel.stage_context(teacher, teacher, 20, 24, random_init=False)
    batches = [_batch(32, seed) for seed in (7, 8)]

    def run(state, ctx, put_batch):
        out = []
        for b in batches:
            state, m = outer(state, put_batch(b), ctx)
            out.append(m)
        return state, out

    ref_state, ref_metrics = run(
        bilevel.init_state(memory, tx, seed=0, capacity=24), ctx, jax.device_put
    )
    state = parallel.put_replicated(bilevel.init_state(memory, tx, seed=0, capacity=24), mesh)
    state, metrics = run(
        state, parallel.put_replicated(ctx, mesh), functools.partial(parallel.put_batch, mesh=mesh)
    )
    _close(state.syn, ref_state.syn)
    _close(state.opt_state, ref_state.opt_state)
    for m, r in zip(metrics, ref_metrics, strict=True):
        assert int(m["window_start"]) == int(r["window_start"])
        _close(m, r, rtol=1e-4, atol=1e-5)
    # The memory stays replicated (every device holds the whole memory).
    assert all(_spec(a) == P() for a in jax.tree.leaves(state.syn))
    assert (
        float(jnp.max(jnp.abs(state.syn["e"] - jnp.pad(memory.e_NxFxD, ((0, 4), (0, 0), (0, 0))))))
        > 0
    )


# ------------------------------------------------------------------ loader: sharded and per-process


@has4
def test_loader_batches_are_sharded_and_split_per_process(mesh, tiny_store):
    stage = tiny_store.stages("validation")[0]
    rows = parallel.batch_sharding(mesh)
    plain = list(loader.device_batches(stage, 1024, shuffle=False, drop_remainder=False))
    sharded = list(
        loader.device_batches(stage, 1024, shuffle=False, drop_remainder=False, sharding=rows)
    )
    assert len(sharded) == len(plain) == 3  # 3000 rows: the last batch padded
    for a, b in zip(sharded, plain, strict=True):
        assert a["x"].sharding.is_equivalent_to(rows, 2)
        _close(a, b, rtol=0, atol=0)
    # What each of 3 processes would read: its block of every global batch, padding included.
    full = loader.batch_dataset(stage, 96, shuffle=True, seed=1, drop_remainder=False)
    parts = [
        loader.batch_dataset(
            stage, 96, shuffle=True, seed=1, drop_remainder=False, rows=(32 * i, 32 * (i + 1))
        )
        for i in range(3)
    ]
    for b in (0, len(full) - 1):
        glued = {k: np.concatenate([p[b][k] for p in parts]) for k in full[b]}
        _close(glued, full[b], rtol=0, atol=0)
    assert full[len(full) - 1]["w"].sum() == len(stage) % 96


def test_in_process_checks_run_in_a_subprocess_without_4_devices():
    """Only when this session has fewer than 4 devices: rerun this file with 4."""
    if jax.device_count() >= NDEV:
        pytest.skip("this session has 4 devices; the checks above ran in process")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", __file__, "-k", "not subprocess"],
        env=_env(NDEV),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


# ------------------------------------------------------------------ end to end and multi-process


def test_main_tiny_end_to_end_on_4_devices(tmp_path):
    """`main` on :tiny with the mesh on and the table sharded, in a 4-device subprocess."""
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "diet_jax.main",
        "--config=configs/synthetic.py:tiny",
        f"--workdir={workdir}",
        "--config.parallel.enabled=True",
        "--config.parallel.shard_embeddings=True",
        "--config.evaluate.models=('dcn',)",
        "--config.evaluate.methods=('warmup_start','diet')",
    ]
    out = subprocess.run(cmd, env=_env(NDEV), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    assert res["devices"] == NDEV
    got = {(r["method"], r["model"]): r for r in res["results"]}
    assert {("reference", "dcn"), ("warmup_start", "dcn"), ("diet", "dcn")} <= set(got)
    for r in got.values():
        assert 0.5 < r["auc"] <= 1.0 and np.isfinite(r["logloss"])
    assert os.path.isfile(os.path.join(workdir, "report.md"))


_TWO_PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np
    from diet_jax import parallel
    from diet_jax.data import loader
    from diet_jax.data.store import StageStore
    from diet_jax.models import build_model
    from diet_jax.train import loop, steps
    import importlib.util  # configs/ is a folder of files (conftest would reset the devices)
    spec = importlib.util.spec_from_file_location("synthetic", "configs/synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    pid, port, store_root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    cfg = module.get_config("tiny")
    cfg.parallel.enabled = True
    cfg.parallel.distributed = True
    cfg.parallel.coordinator_address = "localhost:" + port
    cfg.parallel.num_processes = 2
    cfg.parallel.process_id = pid
    assert parallel.maybe_initialize_distributed(cfg)
    mesh = parallel.mesh_from_config(cfg)
    assert jax.process_count() == 2 and mesh.shape["data"] == 4
    store = StageStore(store_root)
    model = build_model(cfg.model, store.feature_map)
    trainer = steps.make_trainer(model, cfg.train)
    state = trainer.init(*model.init(jax.random.key(0)))
    state = parallel.put(state, parallel.state_shardings(state, mesh))
    stage = store.stages("historical")[0]
    rows = parallel.batch_sharding(mesh)
    state, stats = loop.train_epoch(
        trainer.step, state, stage, batch_size=256, seed=0, progress=False, sharding=rows
    )
    logits = loop.predict(
        steps.make_predict_step(model), state.params, state.model_state,
        store.stages("validation")[0], 1024, sharding=rows,
    )
    if parallel.is_main_process():
        with open(out, "w") as f:
            json.dump({"loss": stats["loss"], "logits": logits[:50].tolist(),
                       "rows": len(logits)}, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_read_their_rows_and_match_one_process(tmp_path, tiny_store):
    """jax.distributed over 2 local processes x 2 CPU devices (gloo): each process reads half
    of every batch; the epoch's loss and the predictions equal a 1-process run on 4 devices."""
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS)
    port = str(_free_port())
    outs = [str(tmp_path / "two.json"), str(tmp_path / "unused.json")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, tiny_store.root, outs[pid]],
            env=_env(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert not os.path.exists(outs[1])  # only process 0 writes
    with open(outs[0]) as f:
        two = json.load(f)

    # The same epoch on one process with 4 devices: same batches, same numbers.
    from diet_jax.train import loop

    cfg = load_config("synthetic", "tiny")
    model = build_model(cfg.model, tiny_store.feature_map)
    trainer = steps.make_trainer(model, cfg.train)
    state = trainer.init(*model.init(jax.random.key(0)))
    stage = tiny_store.stages("historical")[0]
    state, stats = loop.train_epoch(
        trainer.step, state, stage, batch_size=256, seed=0, progress=False
    )
    logits = loop.predict(
        steps.make_predict_step(model),
        state.params,
        state.model_state,
        tiny_store.stages("validation")[0],
        1024,
    )
    assert two["rows"] == len(logits)
    np.testing.assert_allclose(two["loss"], stats["loss"], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(two["logits"]), logits[:50], rtol=1e-3, atol=1e-4)
