"""The whole DIET pipeline for one config: idempotent and resumable.

Each phase is a banner-commented section; each finds its finished artifacts under the workdir
and skips them on a rerun. Outputs: results.json (the output contract, see README),
metrics.jsonl, config.json.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from diet_jax import parallel
from diet_jax import results as results_lib
from diet_jax.data import prepare
from diet_jax.distill import driver as distill_driver
from diet_jax.evaluate import methods, report
from diet_jax.io_utils import MetricsWriter, atomic_write_json
from diet_jax.train import loop
from diet_jax.train.reference import train_reference
from diet_jax.train.steps import make_predict_step


def check_config(config) -> None:
    """Rejects values that would fail later with an obscure error."""
    for key in ("batch_size", "eval_batch_size", "log_every"):
        if config.train[key] <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {config.train[key]}.")
    if config.train.learning_rate <= 0:
        raise ValueError(
            f"config.train.learning_rate must be positive, got {config.train.learning_rate}."
        )
    if not 0 < config.ratio <= 1:
        raise ValueError(f"config.ratio must lie in (0, 1], got {config.ratio}.")
    if config.model.embed_dim <= 0:
        raise ValueError(f"config.model.embed_dim must be positive, got {config.model.embed_dim}.")


def run(config, workdir: str) -> dict:
    """Runs every phase that exists; returns the results.json content."""
    check_config(config)
    # Scale-out: multi-host initialisation first (before any JAX computation), then the mesh,
    # which checks that the batch sizes divide over the data axis before any work starts.
    parallel.maybe_initialize_distributed(config)
    rows = parallel.batch_sharding(parallel.mesh_from_config(config))
    t_start = time.perf_counter()
    is_main = parallel.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    writer = MetricsWriter(workdir, enabled=is_main)
    res = results_lib.load_or_new(workdir)
    timings = res["timings"]

    # ---------------------------------------------------------------- Data
    t0 = time.perf_counter()
    store = parallel.main_first(lambda: prepare.prepare(config, workdir), "prepare")
    fmap = store.feature_map
    timings["data_seconds"] = time.perf_counter() - t0
    results_lib.describe(res, config, fmap, devices=jax.device_count())

    # ---------------------------------------------------------------- Reference model
    ref = train_reference(config, store, workdir, writer)
    if ref.train_seconds > 0:
        timings["teacher_train_seconds"] = ref.train_seconds
        timings["teacher_train_samples"] = ref.train_samples
        timings["teacher_samples_per_second"] = ref.train_samples / ref.train_seconds
    timings["teacher_restored_stages"] = ref.restored

    # ---------------------------------------------------------------- Evaluate the reference
    predict_step = make_predict_step(ref.model)
    for role in ("validation", "test"):
        stage = store.stages(role)[0]
        m = loop.evaluate(
            predict_step,
            ref.final.params,
            ref.final.model_state,
            stage,
            config.train.eval_batch_size,
            fmap.tasks,
            sharding=rows,
        )
        writer.write(phase="reference_eval", split=role, auc=m["auc"], logloss=m["logloss"])
        logging.info("reference on %s: AUC %.4f LogLoss %.4f", role, m["auc"], m["logloss"])
        if role == "test":
            results_lib.upsert(
                res,
                results_lib.entry(
                    "reference",
                    config.teacher.model,
                    m,
                    timings.get("teacher_train_seconds", 0.0),
                    ref.train_samples,
                ),
            )
        else:
            res["reference_validation"] = m

    # ---------------------------------------------------------------- Distillation
    dist = distill_driver.distill(config, store, ref, workdir, writer)
    diet_memory = dist.final  # D_syn^T
    if dist.seconds > 0:
        timings["distill_seconds"] = dist.seconds
        timings["distill_stages"] = dist.stages
    timings["distill_restored_stages"] = dist.restored

    # ---------------------------------------------------------------- Candidates x methods
    if config.evaluate.methods:  # evaluate.models = () means the whole candidate pool

        def save(r):
            if is_main:
                results_lib.save(workdir, r)

        methods.run_all(config, store, ref, workdir, res, diet_memory, writer, save=save)

    timings["total_seconds"] = time.perf_counter() - t_start
    if is_main:
        results_lib.save(workdir, res)
        report.write_report(workdir, res)
    return res
