"""One-accelerator benchmark: teacher training, distillation, influence throughput and MFU.

    python experiments/bench_gpu.py [--config=configs/synthetic.py] [--small] [--json=out.json]

Finishes in a few minutes on one GPU (compilation included); on CPU (`--small`, automatic when
the platform is cpu) it uses smaller sizes. Everything runs over `parallel.make_mesh()` (all
devices, batches split along `data`, the state replicated), so on several devices it measures
the data-parallel path; on one device that mesh is trivial.

1. teacher: samples/s of the jitted, donating train step of the config's teacher (DCN + MMoE by
   default) at batch 4096 (`--small`: 1024), for each embedding optimizer (dense_adam, and the
   row-sparse lazy_adam and rowwise_adagrad). Batches of uniform random ids already on the
   device: the step, not the loader.
2. distill: meta-iterations/s of one jitted outer iteration of `distill/bilevel.py` at the
   config's distillation settings (`driver.bilevel_config`), with a memory of the capacity the
   driver would use for the config's stream and the config's real minibatch.
3. influence: samples/s of `influence.grad_dot` (the jvp of Deficiency) over real samples
   against G_syn of that memory, 65,536 samples per call (`--small`: 8,192).
4. MFU: FLOPs of the compiled step from XLA's `cost_analysis()`, divided by the measured time
   and by the device's peak FLOP/s (table below; dense, no sparsity). Not given for the outer
   iteration: XLA counts a loop body once, and its inner loop runs M times.

Compilation is timed apart (ahead-of-time `.lower().compile()`), never in the rates.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax import influence, parallel
from diet_jax.data.store import FeatureMap
from diet_jax.distill import bilevel, driver
from diet_jax.distill import memory as memory_lib
from diet_jax.models import build_model
from diet_jax.train.steps import make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_SMALL = flags.DEFINE_boolean("small", None, "Smaller sizes; default: on when the platform is cpu.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Timed seconds per measurement (at most).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")

# Peak dense FLOP/s per device: (fp32 without tensor cores, tf32 tensor cores, bf16). From the
# vendors' data sheets (SXM parts; sparsity figures halved). f32 matmuls at JAX's default
# precision run on TF32 tensor cores on Ampere and later GPUs.
PEAKS = {
    "H200": (67e12, 494.7e12, 989.4e12),
    "H100 PCIe": (51e12, 378e12, 756e12),
    "H100": (67e12, 494.7e12, 989.4e12),
    "A100": (19.5e12, 156e12, 312e12),
    "L4": (30.3e12, 60e12, 121e12),
    "TPU v4": (None, None, 275e12),
    "TPU v5 lite": (None, None, 197e12),
    "TPU v5p": (None, None, 459e12),
}
CPU_FLOP_PER_CYCLE = 32  # fp32: two 256-bit FMA pipes per core (an estimate, stated as such)


def peak(device) -> tuple[str, float | None, float | None]:
    """(what the peak is, FLOP/s, fp32 FLOP/s without tensor cores) for MFU: tf32 on GPUs, bf16
    on TPUs, an estimate on CPU."""
    kind = device.device_kind
    if device.platform == "cpu":
        mhz = 0.0
        try:
            with open("/proc/cpuinfo") as f:
                mhz = max(float(ln.split(":")[1]) for ln in f if ln.startswith("cpu MHz"))
        except (OSError, ValueError):
            pass
        cores = os.cpu_count() or 1
        if not mhz:
            return "cpu peak unknown", None, None
        est = cores * mhz * 1e6 * CPU_FLOP_PER_CYCLE
        return f"CPU estimate {cores} cores x {mhz / 1e3:.2f} GHz x {CPU_FLOP_PER_CYCLE}", est, est
    for name, (fp32, tf32, bf16) in PEAKS.items():
        if name in kind:
            if tf32:
                return f"{name} tf32 dense", tf32, fp32
            return f"{name} bf16 dense", bf16, fp32
    return f"{kind}: peak unknown", None, None


def flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def run_timed(fn, state, inputs, seconds: float, max_steps: int):
    """Calls state = fn(state, inputs[i % len]) until `seconds` or `max_steps`; returns
    (state, steps, elapsed). The first call after compilation is untimed (allocation)."""
    state = jax.block_until_ready(fn(state, inputs[0]))
    steps, start = 0, time.perf_counter()
    while steps < max_steps:
        state = fn(state, inputs[steps % len(inputs)])
        steps += 1
        if steps % 10 == 0 or steps == max_steps:
            jax.block_until_ready(state)
            if time.perf_counter() - start > seconds:
                break
    jax.block_until_ready(state)
    return state, steps, time.perf_counter() - start


def random_batches(rng, n: int, bs: int, fmap, mesh) -> list[dict]:
    out = []
    for _ in range(n):
        x = np.stack([rng.integers(0, v, bs) for v in fmap.vocab_sizes], 1).astype(np.int32)
        y = (rng.random((bs, fmap.num_tasks)) < 0.2).astype(np.uint8)
        out.append(parallel.put_batch({"x": x, "y": y, "w": np.ones(bs, np.float32)}, mesh))
    return out


def main(_):
    config = _CONFIG.value
    dev = jax.devices()[0]
    small = dev.platform == "cpu" if _SMALL.value is None else _SMALL.value
    d = config.data
    fmap = FeatureMap("bench", tuple(d.field_names), tuple(d.vocab_sizes), tuple(d.tasks), ())
    mesh = parallel.make_mesh(0)
    ndev = parallel.data_size(mesh)
    peak_name, peak_flops, fp32_flops = peak(dev)
    model = build_model(config.model, fmap, name=config.teacher.model)
    rng = np.random.default_rng(0)
    report = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "devices": ndev,
        "small": small,
        "peak": peak_name,
        "peak_flops": peak_flops,
        "fp32_peak_flops": fp32_flops,
    }
    print(f"device: {dev.device_kind} x{ndev} ({dev.platform}); small={small}; peak: {peak_name}")

    def mfu(flops, seconds_per_call, against=peak_flops):
        if flops is None or against is None:
            return None
        return flops / seconds_per_call / against

    # ------------------------------------------------------------------ 1. teacher training
    bs = 1024 if small else 4096
    parallel.check_divisible(bs, mesh, "the benchmark batch")
    batches = random_batches(rng, 8, bs, fmap, mesh)
    report["teacher"] = {}
    for opt in ("dense_adam", "lazy_adam", "rowwise_adagrad"):
        cfg = config.train.copy_and_resolve_references()
        cfg.embedding_optimizer = opt
        trainer = make_trainer(model, cfg)
        state = trainer.init(*model.init(jax.random.key(0)))
        state = parallel.put(state, parallel.state_shardings(state, mesh))
        t0 = time.perf_counter()
        compiled = trainer.step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        flops = flops_of(compiled)
        state, steps, secs = run_timed(
            lambda s, b, c=compiled: c(s, b)[0], state, batches, _SECONDS.value, 2000
        )
        r = {
            "batch": bs,
            "samples_per_s": steps * bs / secs,
            "ms_per_step": 1e3 * secs / steps,
            "compile_s": compile_s,
            "gflop_per_step": None if flops is None else flops / 1e9,
            "mfu": mfu(flops, secs / steps),
            "mfu_fp32": mfu(flops, secs / steps, fp32_flops),
        }
        report["teacher"][opt] = r
        print(
            f"teacher {config.teacher.model}+MMoE {opt:15s} batch {bs}: "
            f"{r['samples_per_s']:>12,.0f} samples/s  {r['ms_per_step']:7.2f} ms/step  "
            f"compile {compile_s:5.1f} s  {_fmt_flops(flops)}/step  MFU {_fmt_pct(r['mfu'])}"
        )
        del state, compiled

    # ------------------------------------------------------------------ 2. distillation
    dc = config.distill
    stage_rows = [d.stage_rows] * d.num_historical_stages
    sizes = driver.memory_sizes(config, stage_rows)
    capacity, rows = max(sizes), min(sizes)
    real_bs = driver.real_batch_size(config)
    parallel.check_divisible(real_bs, mesh, "the distillation minibatch")
    bcfg = driver.bilevel_config(config, rows, real_bs)
    tx = bilevel.make_meta_optimizer(dc)
    outer = bilevel.make_outer_step(model, bcfg, tx)
    params, model_state = model.init(jax.random.key(1))
    teacher = type("Teacher", (), {"params": params, "model_state": model_state})
    f, k, dim = fmap.num_fields, fmap.num_tasks, config.model.embed_dim
    ks = jax.random.split(jax.random.key(2), 4)
    memory = memory_lib.new(
        0.01 * jax.random.normal(ks[0], (capacity, f, dim)),
        jax.random.normal(ks[1], (capacity, k)),
        origin=1,
    )
    ctx = parallel.put_replicated(
        bilevel.stage_context(teacher, teacher, capacity, capacity, random_init=False), mesh
    )
    dstate = parallel.put_replicated(bilevel.init_state(memory, tx, seed=0), mesh)
    real = random_batches(rng, 4, real_bs, fmap, mesh)
    t0 = time.perf_counter()
    compiled = outer.lower(dstate, real[0], ctx).compile()
    compile_s = time.perf_counter() - t0
    dstate, steps, secs = run_timed(
        lambda s, b: compiled(s, b, ctx)[0], dstate, real, _SECONDS.value, 500
    )
    report["distill"] = {
        "meta_iterations_per_s": steps / secs,
        "ms_per_iteration": 1e3 * secs / steps,
        "compile_s": compile_s,
        "memory_rows": capacity,
        "real_batch": real_bs,
        "inner_steps": bcfg.inner_steps,
        "window": bcfg.window,
        "active": bcfg.active_size,
        "hard": bcfg.hard_size,
        "address_pool": getattr(bcfg, "address_pool", 0),
    }
    print(
        f"distill outer iteration (memory {capacity}, batch {real_bs}, M={bcfg.inner_steps}, "
        f"W={bcfg.window}, active {bcfg.active_size}, hard {bcfg.hard_size}): "
        f"{steps / secs:,.2f} meta-iterations/s  {1e3 * secs / steps:.1f} ms  "
        f"compile {compile_s:.1f} s"
    )
    del dstate, compiled

    # ------------------------------------------------------------------ 3. influence
    n_real = 8192 if small else 65536
    parallel.check_divisible(n_real, mesh, "the influence batch")
    params_dense, dense_state = model.init_dense(jax.random.key(3))
    loss_fn = influence.dense_loss(model, dense_state)
    mem = parallel.put_replicated(memory.batch(), mesh)
    params_dense = parallel.put_replicated(params_dense, mesh)
    g_syn_fn = jax.jit(lambda w, b: influence.grad_sum(loss_fn, w, b))
    g_syn = jax.block_until_ready(g_syn_fn(params_dense, mem))
    rows = parallel.batch_sharding(mesh)
    reals = [
        parallel.put(
            {
                "e": 0.01 * jax.random.normal(jax.random.key(10 + i), (n_real, f, dim)),
                "y": (jax.random.uniform(jax.random.key(20 + i), (n_real, k)) < 0.2).astype(
                    jnp.float32
                ),
            },
            rows,
        )
        for i in range(2)
    ]
    dot_fn = jax.jit(lambda w, b, g: influence.grad_dot(loss_fn, w, b, g))
    t0 = time.perf_counter()
    compiled = dot_fn.lower(params_dense, reals[0], g_syn).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(compiled)
    _, steps, secs = run_timed(
        lambda acc, b: acc + compiled(params_dense, b, g_syn)[0],
        jnp.zeros(()),
        reals,
        _SECONDS.value,
        2000,
    )
    report["influence"] = {
        "samples_per_s": steps * n_real / secs,
        "ms_per_call": 1e3 * secs / steps,
        "samples_per_call": n_real,
        "memory_rows": capacity,
        "compile_s": compile_s,
        "gflop_per_call": None if flops is None else flops / 1e9,
        "mfu": mfu(flops, secs / steps),
        "mfu_fp32": mfu(flops, secs / steps, fp32_flops),
    }
    print(
        f"influence grad_dot ({n_real} real samples, G_syn over {capacity} rows): "
        f"{steps * n_real / secs:>12,.0f} samples/s  {1e3 * secs / steps:.1f} ms/call  "
        f"{_fmt_flops(flops)}/call  MFU {_fmt_pct(report['influence']['mfu'])}"
    )
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(report, fh, indent=2)


def _fmt_flops(flops) -> str:
    return "n/a" if flops is None else f"{flops / 1e9:.2f} GFLOP"


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


if __name__ == "__main__":
    app.run(main)
