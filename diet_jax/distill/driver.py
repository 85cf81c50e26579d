"""The DIET stage driver: for t = 1..T, phase 1 (boundary memory) then phase 2 (refinement).

Artifacts under `<workdir>/distill/stage_XX/`:

    init/     Orbax: the phase-1 memory (before refinement)
    ckpt/step_XXXXXX/  Orbax: DistillState every `checkpoint_every` outer iterations (memory,
              optimizer state, RNG key, iteration); the last one kept; removed when done
    memory/   Orbax: the refined memory D_syn^t, written last; with its stamp it marks the
              stage done

Each artifact has a stamp (`checkpoint.py`) with its fingerprint: phase 1's keys, the teacher's
and the previous stage's memory's fingerprints for init/; phase 2's keys and init/'s for ckpt/
and memory/. A rerun skips finished stages, reuses a saved phase-1 memory, and resumes phase 2
from the last checkpoint, each only when its fingerprint matches and its files are intact;
otherwise it recomputes from the previous good artifact. A NaN/Inf meta loss or meta-gradient
norm stops phase 2 naming the last good checkpoint (train.nan_policy = "stop"), or leaves the
state unchanged for that iteration ("skip_batch"). Real minibatch k of a stage is a pure function of (seed, k) and the RNG of outer
iteration k is fold_in(key, k), so a killed and resumed run ends with the same memory as an
uninterrupted one. D_syn^T, the last stage's memory, is the distilled dataset: memory fusion
carries the earlier stages' rows into it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from diet_jax import checkpoint, parallel
from diet_jax import fingerprint as fp_lib
from diet_jax import metrics as metrics_lib
from diet_jax.data import loader
from diet_jax.data.store import Stage, StageStore
from diet_jax.distill import bilevel, phase1
from diet_jax.distill import memory as memory_lib
from diet_jax.distill.memory import Memory
from diet_jax.io_utils import MetricsWriter
from diet_jax.models import factory
from diet_jax.train.loop import NonFiniteTracker
from diet_jax.train.steps import inject_nan_step


@dataclasses.dataclass
class DistillRun:
    root: str  # <workdir>/distill
    stage_names: list[str]
    final: Memory  # D_syn^T
    seconds: float  # spent distilling in this run (0 when every stage was restored)
    stages: dict[str, dict]  # per stage: phase1/phase2 seconds, iterations, rows, ...
    restored: list[str]  # stages found finished on disk
    fingerprint: str = ""  # of D_syn^T (its stamp's)

    def memory(self, t: int) -> Memory:
        """D_syn^t (1-based), read back from its checkpoint."""
        return memory_lib.load(memory_path(self.root, t))


def distill_root(workdir: str) -> str:
    return os.path.join(workdir, "distill")


def stage_dir(root: str, t: int) -> str:
    return os.path.join(root, f"stage_{t:02d}")


def memory_path(root: str, t: int) -> str:
    return os.path.join(stage_dir(root, t), "memory")


def load_final(workdir: str) -> Memory:
    """The distilled dataset D_syn^T of a finished run: the memory of the last stage on disk."""
    root = distill_root(workdir)
    done = sorted(d for d in os.listdir(root) if memory_lib.exists(os.path.join(root, d, "memory")))
    if not done:
        raise FileNotFoundError(f"No distilled memory under {root!r}.")
    return memory_lib.load(os.path.join(root, done[-1], "memory"))


STRATA_PICKS = ("middle", "random")


def pick_seed(config, t: int) -> int | None:
    """Stage t's seed of phase 1's random stratified pick (`distill.strata_pick` = "random"),
    from config.seed: each evaluation seed's distillation draws its own rows; None = the middle
    of each score range (deterministic given the teacher)."""
    if config.distill.get("strata_pick", "middle") != "random":
        return None
    return int(config.seed) * 1000 + int(t)


def check_config(dc) -> None:
    """Rejects distillation settings that would fail later with an obscure error."""
    for key in ("outer_iterations", "inner_steps", "window", "log_every"):
        if dc[key] <= 0:
            raise ValueError(f"config.distill.{key} must be positive, got {dc[key]}.")
    if not dc.window <= dc.inner_steps:
        raise ValueError(
            f"config.distill.window ({dc.window}) must not exceed inner_steps ({dc.inner_steps})."
        )
    if not 0 < dc.hard_fraction <= 1:
        raise ValueError(
            f"config.distill.hard_fraction must lie in (0, 1], got {dc.hard_fraction}."
        )
    if not 0 <= dc.percentile <= 1:
        raise ValueError(f"config.distill.percentile must lie in [0, 1], got {dc.percentile}.")
    if isinstance(dc.strata, bool) or not isinstance(dc.strata, int) or dc.strata < 0:
        raise ValueError(
            "config.distill.strata must be 0 (one score range per row kept) or a positive "
            f"integer, got {dc.strata!r}."
        )
    if dc.get("strata_pick", "middle") not in STRATA_PICKS:
        raise ValueError(
            f"config.distill.strata_pick must be one of {STRATA_PICKS}, got {dc.strata_pick!r}."
        )
    for key in ("inner_lr", "meta_lr_embed", "meta_lr_labels"):
        if dc[key] <= 0:
            raise ValueError(f"config.distill.{key} must be positive, got {dc[key]}.")
    if dc.group_split not in phase1.GROUP_SPLITS:
        raise ValueError(
            f"config.distill.group_split must be one of {phase1.GROUP_SPLITS}, "
            f"got {dc.group_split!r}."
        )
    if dc.retention not in RETENTION:
        raise ValueError(
            f"config.distill.retention must be one of {RETENTION}, got {dc.retention!r}."
        )
    if dc.reanchor not in phase1.REANCHOR:
        raise ValueError(
            f"config.distill.reanchor must be one of {phase1.REANCHOR}, got {dc.reanchor!r}."
        )
    if dc.influence_at not in bilevel.INFLUENCE_AT:
        raise ValueError(
            f"config.distill.influence_at must be one of {bilevel.INFLUENCE_AT}, "
            f"got {dc.influence_at!r}."
        )


def real_batch_size(config) -> int:
    return config.distill.batch_size or config.train.batch_size


RETENTION = ("paper", "cumulative")


def retained_rows(config, n_t: int, earlier: int) -> int:
    """Rows memory fusion keeps from D_syn^{t-1} at stage t, given n_t and the budgets of the
    earlier stages summed (`earlier`): n_t (`retention = "paper"`, appendix A.3) or `earlier`
    (`"cumulative"`: D_syn^t holds sum_{s<=t} n_s rows, as many as the selection baselines)."""
    if not config.distill.memory_fusion:
        return 0
    return n_t if config.distill.retention == "paper" else earlier


def memory_sizes(config, stage_rows: list[int]) -> list[int]:
    """Rows of D_syn^t for t = 1..T: n_t new rows plus, with fusion, the retained ones."""
    sizes, previous, earlier = [], 0, 0
    for rows in stage_rows:
        n = phase1.budget(rows, config.ratio)
        sizes.append(n + min(retained_rows(config, n, earlier), previous))
        previous, earlier = sizes[-1], earlier + n
    return sizes


def bilevel_config(config, memory_rows: int, batch_size: int) -> bilevel.BilevelConfig:
    """`memory_rows`: the smallest memory the step will see (the active set must fit in it)."""
    dc = config.distill
    active = dc.active_size or dc.window * dc.inner_steps  # the paper's W x M (appendix A.3)
    if dc.address_pool:
        active = min(active, dc.address_pool)
    return bilevel.BilevelConfig(
        inner_steps=dc.inner_steps,
        window=dc.window,
        inner_lr=dc.inner_lr,
        hard_size=max(1, min(batch_size, int(round(dc.hard_fraction * batch_size)))),
        active_size=max(1, min(memory_rows, active)),
        target_selection=dc.target_selection,
        memory_selection=dc.memory_selection,
        learn_labels=dc.learn_labels,
        influence_at=dc.influence_at,
        remat=dc.remat,
        chunk_size=dc.chunk_size or None,
        address_pool=dc.address_pool,
    )


_OPTIMIZER_KEYS = ("meta_lr_embed", "meta_lr_labels", "learn_labels", "max_grad_norm")


@functools.cache
def _optimizer_and_step(
    model,
    bcfg: bilevel.BilevelConfig,
    optimizer_items: tuple,
    nan_policy: str = "stop",
    inject_nan: int = -1,
):
    """(meta optimizer, jitted outer step), built once per process for equal settings: a rerun
    in the same process (tests, notebooks) neither traces nor compiles again."""
    tx = bilevel.make_meta_optimizer(types.SimpleNamespace(**dict(optimizer_items)))
    return tx, _guarded(bilevel.make_outer_step(model, bcfg, tx), nan_policy, inject_nan)


def _guarded(outer_step, nan_policy: str, inject_nan: int):
    """The outer step with a `finite` flag (meta loss and meta-gradient norm) in its metrics.

    skip_batch: a non-finite iteration keeps the memory and optimizer state (the iteration
    still counts, so minibatch k stays batch k). `inject_nan` >= 0 (test switch): the metrics
    of that outer iteration read NaN, as if its loss had been.
    """

    def step(state, batch, ctx):
        new, m = outer_step(state, batch, ctx)
        if inject_nan >= 0:
            poison = jnp.where(state.step == inject_nan, jnp.nan, 1.0)
            m = {**m, "meta_loss": m["meta_loss"] * poison}
        finite = jnp.isfinite(m["meta_loss"]) & jnp.isfinite(m.get("grad_norm", 0.0))
        if nan_policy == "skip_batch":
            kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
            new = kept.replace(step=new.step)
            m = {**m, "skipped": ~finite}
        return new, {**m, "finite": finite}

    return jax.jit(step, donate_argnums=0)


def _real_batch(
    stage: Stage, k: int, batch_size: int, seed: int, cache: dict, sharding=None
) -> dict:
    """Minibatch k of the stage: batch k mod n of the shuffled epoch k div n (no iterator state
    to save: resuming at k gives the same batch). With a `sharding` the batch is split over the
    mesh and each process reads only its rows of it."""
    n = loader.num_batches(len(stage), batch_size, drop_remainder=True)
    epoch, b = divmod(k, n)
    if cache.get("epoch") != epoch:
        cache["epoch"] = epoch
        rows = parallel.local_rows(sharding, batch_size)
        cache["ds"] = loader.batch_dataset(
            stage, batch_size, shuffle=True, seed=seed, epoch=epoch, rows=rows
        )
    if sharding is None:
        return jax.device_put(cache["ds"][b])
    return parallel.global_batch(cache["ds"][b], sharding, batch_size)


def _hard_auc(logits_BxK, y_BxK) -> float:
    """Mean over tasks with both classes among the hard targets (NaN if none)."""
    logits, y = parallel.to_host(logits_BxK), parallel.to_host(y_BxK)
    aucs = [metrics_lib.auc(y[:, k], logits[:, k]) for k in range(y.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _as_tree(state: bilevel.DistillState) -> dict:
    return {"step": state.step, "syn": state.syn, "opt_state": state.opt_state, "key": state.key}


def _step_dirs(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    paths = (os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir) if d.startswith("step_"))
    return sorted(p for p in paths if os.path.isdir(p))  # the folders, not their stamps


def _step_dir(ckpt_dir: str, k: int) -> str:
    return os.path.join(ckpt_dir, f"step_{k:06d}")


def _resume(state, ckpt_dir: str, record: dict | None, desc: str):
    """The newest intact checkpoint under `ckpt_dir` for `record`, or None; others removed."""
    for path in reversed(_step_dirs(ckpt_dir)):
        if record is not None and not checkpoint.valid(path, record, f"{desc} checkpoint"):
            checkpoint.discard(path)
            continue
        try:
            return bilevel.DistillState(**checkpoint.restore(path, _as_tree(state))), path
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
            logging.warning("%s: checkpoint %s cannot be read (%s): removed", desc, path, e)
            checkpoint.discard(path)
    return None, None


def refine(
    outer_step,
    state: bilevel.DistillState,
    stage: Stage,
    ctx: dict,
    *,
    iterations: int,
    batch_size: int,
    seed: int,
    ckpt_dir: str,
    checkpoint_every: int,
    writer: MetricsWriter | None = None,
    log_every: int = 10,
    progress: bool = True,
    desc: str = "distill",
    log_fields: dict | None = None,
    callback: Callable[[int, dict], None] | None = None,
    sharding=None,
    record: dict | None = None,
    last_good: str | None = None,
) -> tuple[bilevel.DistillState, dict]:
    """Phase 2's loop: `iterations` outer steps from the last checkpoint in `ckpt_dir` (if any).

    Checkpoints every `checkpoint_every` iterations (0: never) to `ckpt_dir/step_XXXXXX`,
    stamped with `record` (phase 2's fingerprint); only a checkpoint whose stamp matches and
    whose files are intact is resumed from. Metrics are read one iteration behind the dispatch;
    the non-finite flags are read at the logging interval and before every checkpoint, so no
    checkpoint holds a NaN state. `last_good`: named in the NaN message when no checkpoint of
    this stage exists yet. `callback(k, metrics)` runs after iteration k (tests use it to kill).
    `sharding`: real minibatches split over a mesh (`parallel.batch_sharding`); `state` and
    `ctx` already placed on it.
    """
    stats = {"seconds": 0.0, "iterations": 0, "resumed_from": 0}
    found, path = _resume(state, ckpt_dir, record, desc)
    if found is not None:
        state, last_good = found, path
        stats["resumed_from"] = int(state.step)
        logging.info("%s: resumed phase 2 at outer iteration %d", desc, int(state.step))
    stage_name = (log_fields or {}).get("stage")
    tracker = NonFiniteTracker("distill", stage_name, last_good)
    k0 = int(state.step)
    bar = tqdm(
        total=iterations, initial=k0, desc=desc, unit="it", disable=not progress, leave=False
    )
    cache: dict = {}
    pending = None
    start = time.perf_counter()
    steady_start, steady_k = None, 0
    for k in range(k0, iterations):
        batch = _real_batch(stage, k, batch_size, seed, cache, sharding)
        state, m = outer_step(state, batch, ctx)
        tracker.add(m, k)
        if pending is not None:
            _report(pending, k - 1, bar, writer, log_every, log_fields, iterations, tracker)
        pending = m
        if k == k0:
            jax.block_until_ready(state)  # compilation: excluded from the steady rate
            steady_start, steady_k = time.perf_counter(), k + 1
        done = k + 1
        if checkpoint_every and done % checkpoint_every == 0 and done < iterations:
            tracker.check()  # never a checkpoint of a NaN state
            path = _step_dir(ckpt_dir, done)
            checkpoint.save(path, _as_tree(state), record)
            for old in _step_dirs(ckpt_dir):
                if old != path:
                    checkpoint.discard(old)
            tracker.checkpoint = path
        bar.update(1)
        if callback is not None:
            callback(done, m)
    if pending is not None:
        _report(pending, iterations - 1, bar, writer, log_every, log_fields, iterations, tracker)
    tracker.check()
    jax.block_until_ready(state)
    end = time.perf_counter()
    bar.close()
    stats["seconds"] = end - start
    stats["iterations"] = iterations - k0
    stats["skipped"] = tracker.skipped
    if steady_start is not None and iterations - steady_k > 0:
        stats["seconds_per_iteration"] = (end - steady_start) / (iterations - steady_k)
    return state, stats


def _report(m, k, bar, writer, log_every, log_fields, iterations, tracker=None) -> None:
    last = k == iterations - 1
    if k % log_every and not last:
        return
    if tracker is not None:
        tracker.check()  # raises under nan_policy "stop"
    loss = float(m["meta_loss"])
    auc = _hard_auc(m["hard_logits"], m["hard_y"])
    bar.set_postfix(meta_loss=f"{loss:.4f}")
    if writer is not None:
        scalars = {
            key: float(v)
            for key, v in m.items()
            if key not in ("hard_logits", "hard_y", "finite", "skipped")
        }
        writer.write(
            phase="distill",
            iteration=k,
            hard_auc=None if math.isnan(auc) else auc,  # null: no task with both classes
            **scalars,
            **(log_fields or {}),
        )


def distill(
    config,
    store: StageStore,
    ref,
    workdir: str,
    writer: MetricsWriter | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> DistillRun:
    """Distills every historical stage in time order. `ref` is the ReferenceRun (teachers)."""
    dc = config.distill
    check_config(dc)
    model = ref.model
    # Phase 2's proxy: the teacher's architecture, or a user's module (distill.proxy_module),
    # which has no trained parameters to start from: theta_0 is drawn afresh at every stage.
    proxy_model = factory.proxy_from_config(config, store.feature_map) or model
    root = distill_root(workdir)
    bs = real_batch_size(config)
    optimizer_items = tuple((k, dc[k]) for k in _OPTIMIZER_KEYS)
    # Phase 2 pads every stage's memory to one capacity: one compiled outer step for all stages.
    rows = {s.name: s.rows for s in store.feature_map.stages}
    sizes = memory_sizes(config, [rows[s] for s in ref.stage_names])
    capacity = max(sizes, default=1)
    bcfg = bilevel_config(config, min(sizes, default=1), bs)
    # Scale-out: real minibatches split over the data axis; memory, proxy and teachers
    # replicated (the teacher's table row-sharded on request), so every device addresses the
    # whole memory and the compiler all-reduces the influence sums and meta-gradients.
    mesh = parallel.mesh_from_config(config)
    parallel.check_divisible(bs, mesh, "the distillation minibatch (distill.batch_size)")
    previous, restored, stages_info, seconds = None, [], {}, 0.0
    previous_fp, last_good = None, None
    records = stage_records(config, getattr(ref, "fingerprint", None), len(ref.stage_names))
    nan_policy = config.train.get("nan_policy", "stop")
    inject = inject_nan_step(config.train, "distill")
    earlier = 0  # budgets n_s of the stages before t, summed
    for t, name in enumerate(ref.stage_names, start=1):
        n_t = phase1.budget(rows[name], config.ratio)
        retain = retained_rows(config, n_t, earlier)
        earlier += n_t
        final_path = memory_path(root, t)
        init_path = os.path.join(stage_dir(root, t), "init")
        init_record, record = records[t - 1]
        previous_fp = record["fingerprint"]
        found = _load_memory(final_path, record, f"distill {name} memory")
        if found is not None:
            previous, last_good = found, final_path
            restored.append(name)
            logging.info("distill: restored %s from %s", name, final_path)
            continue
        checkpoint.discard(final_path)
        t0 = time.perf_counter()
        stage = store.stage(name)
        teacher = ref.stage_state(t)
        info = {"rows": len(stage)}

        # ---- phase 1: boundary memory (saved, so a resumed phase 2 starts from the same rows)
        memory0 = _load_memory(init_path, init_record, f"distill {name} phase-1 memory")
        if memory0 is None:
            checkpoint.discard(init_path)
            ckpt = os.path.join(stage_dir(root, t), "ckpt")
            shutil.rmtree(ckpt, ignore_errors=True)  # checkpoints of another phase-1 memory
            memory0, p1 = phase1.boundary_memory(
                model,
                teacher,
                stage,
                t,
                previous,
                ratio=config.ratio,
                percentile=dc.percentile,
                fusion=dc.memory_fusion,
                batch_size=config.train.eval_batch_size,
                chunk_size=dc.chunk_size or 4096,
                retain=retain,
                group_split=dc.group_split,
                reanchor_mode=dc.reanchor,
                previous_teacher=ref.stage_state(t - 1)
                if t > 1 and dc.reanchor == "offsets"
                else None,
                rows_of=lambda o, r: store.stage(ref.stage_names[o - 1]).x_NxF[r],
                label_mix=dc.label_mix,
                strata=dc.strata,
                pick_seed=pick_seed(config, t),
            )
            _save_memory(init_path, memory0, init_record)
            info.update(p1)
        info["phase1_seconds"] = time.perf_counter() - t0
        n_rows = info["memory_rows"] = len(memory0)
        if n_rows != sizes[t - 1]:
            raise ValueError(
                f"The phase-1 memory of {name} has {n_rows} rows, {sizes[t - 1]} expected: "
                f"{init_path} comes from another config; remove {root} to distill again."
            )

        # ---- phase 2: bi-level refinement (distill.refine = False: phase 1's rows are D_syn^t)
        if dc.get("refine", True):
            tx, outer_step = _optimizer_and_step(
                proxy_model, bcfg, optimizer_items, nan_policy, inject
            )
            proxy = teacher if t == 1 else ref.stage_state(t - 1)  # theta_0 (random at t = 1)
            if proxy_model is not model:
                proxy = factory.ProxyInit(*proxy_model.init_dense(jax.random.key(config.seed + t)))
            random_init = t == 1 or proxy_model is not model
            ctx = bilevel.stage_context(teacher, proxy, n_rows, capacity, random_init=random_init)
            state = bilevel.init_state(memory0, tx, seed=config.seed + t, capacity=capacity)
            # Phase 2 holds the memory in its state (padded copy, Adam moments): neither D_syn^{t-1}
            # nor phase 1's rows stay alive beside it (the memory grows with the stream), only the
            # rows' provenance.
            previous, memory0 = None, memory0.replace(e_NxFxD=None, logits_NxK=None)
            phase1.release_free_heap()  # phase 1's freed passes, before phase 2's own buffers
            if mesh is not None:
                state = parallel.put_replicated(state, mesh)
                shard = config.parallel.shard_embeddings
                ctx = parallel.put(ctx, parallel.state_shardings(ctx, mesh, shard_embeddings=shard))
            state, p2 = refine(
                outer_step,
                state,
                stage,
                ctx,
                iterations=dc.outer_iterations,
                batch_size=bs,
                seed=config.seed + 1,
                ckpt_dir=os.path.join(stage_dir(root, t), "ckpt"),
                checkpoint_every=dc.checkpoint_every,
                writer=writer,
                log_every=dc.log_every,
                progress=config.progress,
                desc=f"distill {name}",
                log_fields={"stage": name},
                callback=callback,
                sharding=parallel.batch_sharding(mesh),
                record=record,
                last_good=last_good or init_path,
            )
            memory = memory0.with_trainable(jax.tree.map(lambda a, n=n_rows: a[:n], state.syn))
        else:
            memory, p2 = memory0, {"seconds": 0.0, "iterations": 0, "resumed_from": 0}
        # Phase 2's state (the memory padded to the largest stage's rows and its two Adam
        # moments) and context are not kept through the next stage's phase 1.
        state = ctx = None
        _save_memory(final_path, memory, record)
        last_good = final_path
        shutil.rmtree(os.path.join(stage_dir(root, t), "ckpt"), ignore_errors=True)
        info.update({f"phase2_{k}": v for k, v in p2.items()})
        info["seconds"] = time.perf_counter() - t0
        seconds += info["seconds"]
        stages_info[name] = info
        if writer is not None:
            writer.write(phase="distill_stage", stage=name, **info)
        logging.info(
            "distill %s: %d rows, phase 1 %.1fs, phase 2 %.1fs (%d iterations)",
            name,
            len(memory),
            info["phase1_seconds"],
            p2["seconds"],
            p2["iterations"],
        )
        previous, memory = memory, None  # one name for D_syn^t: phase 2 of t + 1 drops it
    return DistillRun(
        root, list(ref.stage_names), previous, seconds, stages_info, restored, previous_fp or ""
    )


def stage_records(config, teacher_fp: str | None, num_stages: int) -> list[tuple[dict, dict]]:
    """Per stage t = 1..T: (phase-1 record, phase-2 record), the fingerprints of init/ and of
    ckpt/ and memory/. Phase 1 depends on the teacher and the previous stage's memory (fusion);
    phase 2 on phase 1's memory and the teachers (its stage context). The last phase-2 record
    is D_syn^T's. Computed from the config alone, before any work."""
    out, previous_fp = [], None
    for t in range(1, num_stages + 1):
        inputs = {"teacher": teacher_fp, "previous": previous_fp, "stage": t}
        seed = pick_seed(config, t)
        if seed is not None:  # a random pick depends on config.seed
            inputs["pick_seed"] = seed
        init_record = fp_lib.fingerprint(config, "phase1", inputs)
        record = fp_lib.fingerprint(
            config, "phase2", {"teacher": teacher_fp, "init": init_record["fingerprint"]}
        )
        out.append((init_record, record))
        previous_fp = record["fingerprint"]
    return out


def _save_memory(path: str, memory: Memory, record: dict) -> None:
    """Saves a memory and stamps it (the stamp removed first, written once it is complete)."""
    checkpoint.unstamp(path)
    memory_lib.save(path, memory)
    if parallel.is_main_process():
        checkpoint.stamp(path, record)


def _load_memory(path: str, record: dict, what: str) -> Memory | None:
    """The memory at `path` if its stamp matches `record` and its files are intact, else None."""
    if not checkpoint.valid(path, record, what):
        return None
    try:
        return memory_lib.load(path)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
        logging.warning("%s at %s cannot be read (%s): recomputing", what, path, e)
        return None
