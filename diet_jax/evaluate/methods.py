"""Every method of the paper's Table 3 for every candidate model, into results.json.

Selection baselines pick n_t = ratio x |D_t| rows per historical stage (random, EL2N around the
configured percentile, K-means centroid-nearest) and convert them to (embedding, soft label)
rows with the stage's teacher, like DIET's memory. Their rows are saved under
`<workdir>/baselines/<method>` and every finished (method, model) entry is written to
results.json at once, so a rerun picks up where it stopped.
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
from diet_jax.distill import memory as memory_lib
from diet_jax.distill import phase1
from diet_jax.distill.memory import Memory
from diet_jax.evaluate import fidelity, protocol
from diet_jax.io_utils import MetricsWriter
from diet_jax.models import BACKBONES, build_model
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
        parts.append(convert(stage.x_NxF[idx], rows_N=idx))
    return memory_lib.concat(*parts)


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
    """Runs config.evaluate.methods x config.evaluate.models; fills res["results"] and fidelity."""
    ev = config.evaluate
    unknown = sorted(set(ev.methods) - set(results_lib.CANDIDATE_METHODS)) + sorted(
        set(ev.models) - set(BACKBONES)
    )
    if unknown:
        raise ValueError(
            f"Unknown evaluate.methods / evaluate.models {unknown}; methods are "
            f"{results_lib.CANDIDATE_METHODS}, models {BACKBONES}."
        )
    done = {(r["method"], r["model"]) for r in res["results"]}
    todo = [(m, mo) for mo in ev.models for m in ev.methods if ev.rerun or (m, mo) not in done]
    memories: dict[str, Memory] = {}
    if diet_memory is not None:
        memories["diet"] = diet_memory
    for method in {m for m, _ in todo} & set(SELECTIONS):
        path = os.path.join(workdir, "baselines", method)
        if memory_lib.exists(path):
            memories[method] = memory_lib.load(path)
            continue
        start = time.perf_counter()
        memories[method] = selection_memory(method, config, store, ref)
        res["timings"][f"select_{method}_seconds"] = time.perf_counter() - start
        memory_lib.save(path, memories[method])
    teacher_embed = ref.final.params["embed"]
    bar = tqdm(todo, desc="candidates", disable=not config.progress)
    for method, model_name in bar:
        bar.set_postfix(method=method, model=model_name)
        if method in REDUCED and method not in memories:
            raise ValueError(
                f"Method {method!r} needs its memory; DIET's comes from the distillation phase."
            )
        model = build_model(config.model, store.feature_map, name=model_name)
        rows = memories[method].trainable() if method in REDUCED else None
        out = protocol.run_candidate(
            method, model, store, config, teacher_embed, rows, seed=config.seed
        )
        results_lib.upsert(
            res,
            results_lib.entry(
                method, model_name, out.metrics, out.train_seconds, out.train_samples
            ),
        )
        res.setdefault("candidate_info", {})[f"{method}/{model_name}"] = out.info
        logging.info(
            "%s / %s: test AUC %.4f (%.1fs)",
            method,
            model_name,
            out.metrics["auc"],
            out.train_seconds,
        )
        if writer is not None:
            writer.write(
                phase="candidate",
                method=method,
                model=model_name,
                auc=out.metrics["auc"],
                logloss=out.metrics["logloss"],
                train_seconds=out.train_seconds,
            )
        res["fidelity"] = fidelity.fidelity_table(res["results"])
        if save is not None:
            save(res)
    res["fidelity"] = fidelity.fidelity_table(res["results"])
    return res
