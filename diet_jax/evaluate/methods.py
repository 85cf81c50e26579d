"""Every method of the paper's Table 3 for every candidate of the pool and every seed.

Selection baselines pick n_t = ratio x |D_t| rows per historical stage (random, EL2N around the
configured percentile, K-means centroid-nearest) and convert them to (embedding, soft label)
rows with the stage's teacher, like DIET's memory. Their rows are saved under
`<workdir>/baselines/<method>` (random: one draw per seed, `<method>_seed<s>`) and every
finished (method, candidate) entry, all its seeds, is written to results.json at once, so a rerun
picks up where it stopped.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from diet_jax import baselines
from diet_jax import results as results_lib
from diet_jax.data.store import StageStore
from diet_jax.distill import driver as distill_driver
from diet_jax.distill import memory as memory_lib
from diet_jax.distill import phase1
from diet_jax.distill.memory import Memory
from diet_jax.evaluate import fidelity, pool, protocol
from diet_jax.io_utils import MetricsWriter
from diet_jax.train.reference import ReferenceRun

SELECTIONS = ("random", "el2n", "kmeans")
REDUCED = (*SELECTIONS, "diet")


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, table, x_BxF):
    """The teacher's embeddings of rows: K-means' representation (no dense pass needed)."""
    return model.embed(table, x_BxF)


def selection_memory(method: str, config, store: StageStore, ref: ReferenceRun) -> Memory:
    """The baseline's rows from every historical stage, as (embedding, teacher logits) pairs."""
    if method not in SELECTIONS:
        raise ValueError(f"Unknown selection baseline {method!r}; expected one of {SELECTIONS}.")
    ev = config.evaluate
    bs = config.train.eval_batch_size
    parts = []
    for t, name in enumerate(ref.stage_names, start=1):
        stage = store.stage(name)
        n = phase1.budget(len(stage), config.ratio)
        teacher = ref.stage_state(t)
        # Rows -> (embedding, logits) pairs under this stage's teacher, as DIET's memory is built.
        convert = functools.partial(
            phase1.to_memory,
            ref.model,
            teacher.params,
            teacher.model_state,
            origin=t,
            batch_size=bs,
        )
        seed = config.seed * 1000 + t
        if method == "random":
            idx = baselines.random_rows(len(stage), n, seed)
        elif method == "el2n":
            # Streamed: scores on a scratch memmap, the percentile window found in chunks.
            idx = phase1.stage_selection(
                ref.model, teacher, stage, n, ev.el2n_percentile, grouped=False, batch_size=bs
            )
        else:
            # K-means on the rows' embeddings (flattened), fitted on a seeded subsample of at
            # most kmeans_max_rows rows; every row is then assigned in chunks.
            def rep_fn(rows, stage=stage, table=teacher.params["embed"]):
                e = _embed(ref.model, table, np.asarray(stage.x_NxF[rows]))
                return np.asarray(e).reshape(len(rows), -1)

            idx = baselines.kmeans_select(
                rep_fn,
                len(stage),
                n,
                k=ev.kmeans_clusters,
                iters=ev.kmeans_iters,
                seed=seed,
                max_rows=ev.kmeans_max_rows,
            )
        parts.append(
            convert(
                stage.x_NxF[idx],
                rows_N=idx,
                y_NxK=np.asarray(stage.y_NxK[idx]),
                label_mix=ev.selection_label_mix,
            )
        )
    return memory_lib.concat(*parts)


def _selection_memories(method, config, store, ref, workdir, res, seeds) -> dict:
    """{seed: path of its saved Memory} of a selection baseline, each made once and saved:
    random draws new rows for every seed (cheap); EL2N is deterministic and K-means keeps
    config.seed's clustering, shared by every seed. Paths, not rows: `run_all` loads a method's
    rows for one candidate at a time, so host memory holds one method's rows, not every
    method's (the rows are ratio x the stream: they grow with it)."""
    out = {}
    for seed in seeds if method == "random" else seeds[:1]:
        suffix = "" if seed == config.seed else f"_seed{seed}"
        path = os.path.join(workdir, "baselines", method + suffix)
        out[seed] = path
        if memory_lib.exists(path):
            continue
        cfg = config.copy_and_resolve_references()
        cfg.seed = seed
        start = time.perf_counter()
        memory = selection_memory(method, cfg, store, ref)
        key = f"select_{method}_seconds"
        res["timings"][key] = res["timings"].get(key, 0.0) + time.perf_counter() - start
        memory_lib.save(path, memory)
        del memory
    if method != "random":
        out = dict.fromkeys(seeds, out[seeds[0]])
    return out


def diet_memories_per_seed(config, store: StageStore, ref: ReferenceRun, workdir: str, seeds):
    """{seed: D_syn^T of a distillation with config.seed = seed} for the seeds other than
    config.seed (whose distillation is the run's own), each under <workdir>/seeds/seed<s>/ and
    resumed like the run's (evaluate.distill_per_seed)."""
    out = {}
    for seed in seeds:
        if seed == config.seed:
            continue
        cfg = config.copy_and_resolve_references()
        cfg.seed = int(seed)
        out[seed] = distill_driver.distill(
            cfg, store, ref, os.path.join(workdir, "seeds", f"seed{seed}")
        ).final
    return out


def _rows_by_seed(sources: dict) -> dict:
    """{seed: rows} from {seed: Memory or saved path}: a Memory's rows as they are (DIET's, already
    in memory), a path's as a `protocol.LazyRows` that reads them when its seed trains (one object
    per path, so seeds sharing a path share one load). A candidate then holds one selection draw
    at a time, not every seed's."""
    made: dict = {}  # a path by its value, a Memory (not hashable) by identity -> its rows
    out = {}
    for seed, src in sources.items():
        key = src if isinstance(src, str) else id(src)
        if key not in made:
            if isinstance(src, str):
                load = functools.partial(_trainable_rows, src)
                made[key] = protocol.LazyRows(memory_lib.rows(src), load)
            else:
                made[key] = src.trainable()
        out[seed] = made[key]
    return out


def _trainable_rows(path: str) -> dict:
    return memory_lib.load(path).trainable()


def seed_results_entry(method: str, cand, seeds: list[int], outs) -> dict:
    """The results.json entry of one (method, candidate) from `protocol.run_seeds`' runs."""
    per_seed = [
        {
            "seed": seed,
            "auc": float(o.metrics["auc"]),
            "logloss": float(o.metrics["logloss"]),
            "per_task": o.metrics["per_task"],
            "train_seconds": float(o.train_seconds),
            "train_samples": int(o.train_samples),
            "historical_seconds": float(o.info["historical_seconds"]),
            "finetune_seconds": float(o.info["finetune_seconds"]),
            "historical_epochs": int(o.info["historical_epochs"]),
            "lr": float(o.info["lr"]),
            "val_auc": float(o.info["val_auc"]),  # the final model's, on the validation day
        }
        for seed, o in zip(seeds, outs, strict=True)
    ]
    return results_lib.seed_entry(method, cand.name, cand.backbone, per_seed)


def run_all(
    config,
    store: StageStore,
    ref: ReferenceRun,
    workdir: str,
    res: dict,
    diet_memory: Memory | None,
    writer: MetricsWriter | None = None,
    save=None,
) -> dict:
    """Runs config.evaluate.methods x the candidate pool x evaluate.seeds; fills res["results"]
    (one entry per (method, candidate), seed means and per-seed runs) and res["fidelity"]."""
    ev = config.evaluate
    unknown = sorted(set(ev.methods) - set(results_lib.CANDIDATE_METHODS))
    if unknown:
        raise ValueError(
            f"Unknown evaluate.methods {unknown}; methods are {results_lib.CANDIDATE_METHODS}."
        )
    pool.check(config)
    cands, seeds = pool.candidates(config), pool.seeds(config)
    done = {
        (r["method"], r["model"])
        for r in res["results"]
        if r["method"] == "reference" or r.get("seeds") == seeds
    }
    todo = [(m, c) for c in cands for m in ev.methods if ev.rerun or (m, c.name) not in done]
    memories: dict[str, dict] = {}  # method -> {seed: Memory (DIET's) or saved path}
    if diet_memory is not None:
        memories["diet"] = dict.fromkeys(seeds, diet_memory)  # one distillation (config.seed)
        if ev.get("distill_per_seed", False) and "diet" in {m for m, _ in todo}:
            memories["diet"] = diet_memories_per_seed(config, store, ref, workdir, seeds)
            memories["diet"][config.seed] = diet_memory
    for method in sorted({m for m, _ in todo} & set(SELECTIONS)):
        memories[method] = _selection_memories(method, config, store, ref, workdir, res, seeds)
    teacher_embed = ref.final.params["embed"]
    embed_opt = protocol.inherited_embed_opt(ref.final, config)
    # {method: {seed: rows}}, made once: a selection's rows are LazyRows, read when a seed
    # trains (host memory holds one draw at a time), their lengths from the metadata.
    rows_by_method = {m: _rows_by_seed(ms) for m, ms in memories.items()}
    # Rows of every reduced method padded to one length: one compiled epoch per architecture.
    rows_pad = max(
        (protocol.rows_count(r) for rs in rows_by_method.values() for r in rs.values()),
        default=0,
    )
    val = None
    bar = tqdm(todo, desc="candidates", disable=not config.progress)
    for method, cand in bar:
        bar.set_postfix(method=method, model=cand.name)
        if method in REDUCED and method not in memories:
            raise ValueError(
                f"Method {method!r} needs its memory; DIET's comes from the distillation phase."
            )
        model = pool.build(cand, config, store.feature_map)
        if method in REDUCED and val is None:  # the validation day under the teacher's table
            val = protocol.validation_rows(model, teacher_embed, store, config)
        outs = protocol.run_seeds(
            method,
            model,
            store,
            config,
            teacher_embed,
            rows_by_method.get(method),
            seeds,
            val,
            rows_pad,
            embed_opt,
        )
        e = seed_results_entry(method, cand, seeds, outs)
        results_lib.upsert(res, e)
        res.setdefault("candidate_info", {})[f"{method}/{cand.name}"] = [o.info for o in outs]
        logging.info(
            "%s / %s: test AUC %.4f +- %.4f over %d seeds (%.1fs per seed)",
            method,
            cand.name,
            e["auc"],
            e["auc_std"],
            len(seeds),
            e["train_seconds"],
        )
        if writer is not None:
            writer.write(
                phase="candidate",
                method=method,
                model=cand.name,
                backbone=cand.backbone,
                auc=e["auc"],
                auc_std=e["auc_std"],
                logloss=e["logloss"],
                train_seconds=e["train_seconds"],
            )
        # Point estimates after every entry; the bootstrap intervals (about a second per method
        # over a pool) once at the end, and again on a resume.
        res["fidelity"] = fidelity.fidelity_table(res["results"], bootstrap=0)
        if save is not None:
            save(res)
    res["fidelity"] = fidelity.fidelity_table(res["results"], bootstrap=int(ev.bootstrap))
    res["fidelity_ceiling"] = fidelity.noise_ceiling(res["results"])
    return res
