"""Distillation cost against one full-data training epoch, on one historical stage.

    python experiments/bench_distill.py --config=configs/synthetic.py [--iterations=10]

1. Trains the teacher one epoch on stage 1 (the full-data epoch; compilation excluded), which
   also gives phi_1.
2. Phase 1 on stage 1 (EL2N scoring of every row, selection, conversion), timed on a second
   call (compilation excluded, as for the epoch; the first call is printed too).
3. Phase 2: the outer step the driver builds for this config (memory padded to the capacity of
   later stages), compiled once, then --iterations timed outer iterations.

Prints the time per outer iteration and the distillation time per stage extrapolated to
`distill.outer_iterations` (phase 1 + iterations x time per iteration; compilation, paid once per
run, printed apart; phase 1 alone when `distill.refine` is False, the default), and its ratio to
the full-data epoch. The extrapolation is linear in the
iteration count: every iteration does the same work on arrays of the same shapes.
"""

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data import loader, prepare
from diet_jax.distill import bilevel, driver, phase1
from diet_jax.models import build_model
from diet_jax.train import loop
from diet_jax.train.steps import make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the stage store is (or is written); a temp dir if unset."
)
_ITERATIONS = flags.DEFINE_integer("iterations", 10, "Timed outer iterations.")


def main(_):
    config = _CONFIG.value
    dc = config.distill
    workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), "diet_bench_distill")
    store = prepare.prepare(config, workdir)
    fmap = store.feature_map
    stage = store.stages("historical")[0]
    model = build_model(config.model, fmap, name=config.teacher.model)
    bs = config.train.batch_size

    # ---- one full-data epoch of the teacher on the stage (compiled first)
    trainer = make_trainer(model, config.train)
    params, model_state = model.init(jax.random.key(config.seed))
    state = trainer.init(params, model_state)
    warm = next(loader.device_batches(stage, bs, shuffle=True, seed=99, epoch=0))
    state, _ = trainer.step(state, warm)
    jax.block_until_ready(state)
    state, stats = loop.train_epoch(
        trainer.step, state, stage, batch_size=bs, seed=config.seed, epoch=1, progress=False
    )
    epoch_s = stats["seconds"]

    # ---- phase 1 (a first call compiles the scoring and conversion passes)
    def run_phase1():
        t0 = time.perf_counter()
        memory, _ = phase1.boundary_memory(
            model,
            state,
            stage,
            1,
            None,
            ratio=config.ratio,
            percentile=dc.percentile,
            batch_size=config.train.eval_batch_size,
            chunk_size=dc.chunk_size or 4096,
        )
        jax.block_until_ready(memory)
        return memory, time.perf_counter() - t0

    _, phase1_first_s = run_phase1()
    memory0, phase1_s = run_phase1()

    # ---- phase 2
    sizes = driver.memory_sizes(config, [s.rows for s in fmap.stages_with_role("historical")])
    capacity = max(sizes)
    bcfg = driver.bilevel_config(config, min(sizes), driver.real_batch_size(config))
    tx = bilevel.make_meta_optimizer(dc)
    step = bilevel.make_outer_step(model, bcfg, tx)
    dstate = bilevel.init_state(memory0, tx, seed=0, capacity=capacity)
    ctx = bilevel.stage_context(state, state, len(memory0), capacity, random_init=True)
    cache: dict = {}
    batches = [
        driver._real_batch(stage, k, driver.real_batch_size(config), 1, cache)
        for k in range(_ITERATIONS.value + 1)
    ]
    t0 = time.perf_counter()
    dstate, m = step(dstate, batches[0], ctx)
    jax.block_until_ready(dstate)
    compile_s = time.perf_counter() - t0
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        dstate, m = step(dstate, b, ctx)
        jax.block_until_ready(dstate)
        times.append(time.perf_counter() - t0)
    per_it = float(np.median(times))
    # distill.refine = False: a stage is phase 1 alone (phase 2 is still timed, for the record).
    iterations = dc.outer_iterations if dc.get("refine", True) else 0
    stage_s = phase1_s + iterations * per_it

    dense = sum(x.size for x in jax.tree.leaves(params["dense"]))
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  teacher: "
        f"{config.teacher.model} + MMoE ({dense:,} dense params)  stage {stage.name}: "
        f"{len(stage):,} rows"
    )
    print(
        f"memory: {len(memory0)} rows at stage 1, capacity {capacity}; real batch "
        f"{driver.real_batch_size(config)}, hard {bcfg.hard_size}, active {bcfg.active_size}, "
        f"M={bcfg.inner_steps}, W={bcfg.window}, remat={bcfg.remat}"
    )
    print(f"full-data epoch (teacher, {stats['steps']} steps): {epoch_s:.2f} s")
    print(
        f"phase 1 (score {len(stage):,} rows, select, convert): {phase1_s:.2f} s "
        f"(first call with compilation {phase1_first_s:.2f} s)"
    )
    print(
        f"phase 2: first call (trace + compile, once per run) {compile_s:.1f} s; outer "
        f"iteration median {per_it * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max "
        f"{max(times) * 1e3:.0f}, {len(times)} timed)"
    )
    print(
        f"distillation per stage (refine={dc.get('refine', True)}, {iterations} outer "
        f"iterations, extrapolated from {len(times)}): {stage_s:.1f} s = "
        f"{stage_s / epoch_s:.2f}x the full-data epoch"
    )
    print(f"load average {os.getloadavg()[0]:.1f} (shared CPU)")
    print(
        f"outer iterations that fit in one epoch after phase 1: "
        f"{max(0.0, (epoch_s - phase1_s) / per_it):.0f}"
    )


if __name__ == "__main__":
    app.run(main)
