"""The whole DIET pipeline for one config: idempotent and resumable.

Each phase is a banner-commented section; each finds its finished artifacts under the workdir
and skips them on a rerun, when their fingerprint (`fingerprint.py`: the config keys they
depend on and their inputs' fingerprints) is the one this config gives and their files are
intact; otherwise the phase, and everything downstream of it, is recomputed (docs/resuming.md).
One run per workdir (`lock.py`). Outputs: results.json (the output contract, see
docs/outputs.md), metrics.jsonl, config.json.
"""

from __future__ import annotations

import errno
import os
import shutil
import time

import jax
from absl import logging

from diet_jax import checkpoint, config_check, parallel
from diet_jax import fingerprint as fp_lib
from diet_jax import lock as lock_lib
from diet_jax import results as results_lib
from diet_jax.data import prepare
from diet_jax.data.store import StageStore
from diet_jax.distill import driver as distill_driver
from diet_jax.distill import export as distill_export
from diet_jax.errors import UserError
from diet_jax.evaluate import methods, pool, report
from diet_jax.io_utils import MetricsWriter, atomic_write_json
from diet_jax.train import loop
from diet_jax.train.reference import train_reference
from diet_jax.train.steps import make_predict_step

# OS errors that are the storage's, not the code's: the run stops naming the path.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def run(config, workdir: str) -> dict:
    """Runs every phase whose artifacts are missing or out of date; returns results.json's
    content. Raises UserError when another run holds the workdir or the storage refuses a
    write (read-only, full), naming the path."""
    config_check.validate(config)  # every name and range, before any work
    # Scale-out: multi-host initialisation first (before any JAX computation), then the mesh,
    # which checks that the batch sizes divide over the data axis before any work starts.
    parallel.maybe_initialize_distributed(config)
    is_main = parallel.is_main_process()
    try:
        with lock_lib.held(workdir, enabled=is_main):
            return _run(config, workdir, is_main)
    except OSError as e:
        if e.errno in _STORAGE_ERRNOS:
            path = e.filename or workdir
            raise UserError(
                f"Cannot write {path}: {e.strerror}. The run stopped; artifacts that were being "
                "written carry no stamp, so a rerun recomputes them."
            ) from e
        raise


def _phase(name: str) -> None:
    """A log line per phase (experiments/chaos_resume.py kills the run at these)."""
    logging.info("phase: %s", name)


def _run(config, workdir: str, is_main: bool) -> dict:
    rows = parallel.batch_sharding(parallel.mesh_from_config(config))
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    writer = MetricsWriter(workdir, enabled=is_main)
    res = results_lib.load_or_new(workdir)
    timings = res["timings"]

    # ---------------------------------------------------------------- Data
    _phase("data")
    t0 = time.perf_counter()
    store = parallel.main_first(lambda: _prepare(config, workdir), "prepare")
    fmap = store.feature_map
    timings["data_seconds"] = time.perf_counter() - t0
    results_lib.describe(res, config, fmap, devices=jax.device_count())
    # Every result's fingerprint follows from the config and the store's: entries that another
    # config produced leave results.json now, before any work.
    records = _records(config, store)
    if _drop_stale_results(res, records) and is_main:
        results_lib.save(workdir, res)

    # ---------------------------------------------------------------- Reference model
    _phase("teacher")
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
    _phase("distill")
    dist = distill_driver.distill(config, store, ref, workdir, writer)
    diet_memory = dist.final  # D_syn^T
    if dist.seconds > 0:
        timings["distill_seconds"] = dist.seconds
        timings["distill_stages"] = dist.stages
    timings["distill_restored_stages"] = dist.restored
    if is_main:  # the distilled dataset as one file (docs/library.md), written atomically
        distill_export.save_run(config, workdir, store, ref, dist)

    # ---------------------------------------------------------------- Candidates x methods
    _phase("candidates")
    _drop_stale_selections(workdir, records)
    if config.evaluate.methods:  # evaluate.models = () means the whole candidate pool

        def save(r):
            _stamp_results(r, records)
            if is_main:
                _stamp_selections(workdir, records)  # written before the first candidate
                results_lib.save(workdir, r)

        methods.run_all(config, store, ref, workdir, res, diet_memory, writer, save=save)
        if is_main:
            _stamp_selections(workdir, records)
    _stamp_results(res, records)

    timings["total_seconds"] = time.perf_counter() - t_start
    if is_main:
        results_lib.save(workdir, res)
        report.write_report(workdir, res)
    return res


# ---------------------------------------------------------------------------- fingerprints
def _prepare(config, workdir: str) -> StageStore:
    """The stage store, rebuilt when its stamp (data.* keys, file sizes) does not match."""
    root = prepare.store_root(config, workdir)
    record = fp_lib.fingerprint(config, "store")
    if StageStore.exists(root) and not checkpoint.valid(root, record, "stage store"):
        checkpoint.discard(root)
    elif not StageStore.exists(root) and os.path.exists(root):
        shutil.rmtree(root)  # a store without its feature map is unfinished
    if not StageStore.exists(root):
        prepare.prepare(config, workdir)
        # Sizes only: checksumming a store of many GB on every run would cost minutes; a
        # truncated column is caught by its size, and ids out of range by StageStore.stage.
        checkpoint.stamp(root, record, checksums=False)
    else:
        logging.info("data: using the stage store at %s", root)
    return StageStore(root)


def _records(config, store) -> dict:
    """{(method, model): fingerprint record} for the reference and for every candidate method
    and backbone this config could run, and {("selection", method): record} for the selection
    baselines' rows. Upstream: store -> teacher -> memories -> candidates."""
    from diet_jax.evaluate.methods import SELECTIONS
    from diet_jax.models.factory import BACKBONES
    from diet_jax.train.reference import teacher_fingerprint

    store_fp = store.fingerprint
    teacher = teacher_fingerprint(config, store_fp)
    n_stages = len(store.feature_map.stages_with_role("historical"))
    stages = distill_driver.stage_records(config, teacher["fingerprint"], n_stages)
    memory_fp = stages[-1][1]["fingerprint"] if stages else None
    out = {("reference", config.teacher.model): teacher}
    for method in SELECTIONS:
        out[("selection", method)] = fp_lib.fingerprint(
            config, "selection", {"teacher": teacher["fingerprint"], "method": method}
        )
    # Every candidate of the pool, not only the base settings: a variant's entries without a
    # record would lose their fingerprint and be recomputed by every rerun. A candidate's record
    # leaves out the other backbones' sections, not its own backbone's (its overrides are in
    # evaluate.candidates, which every candidate record covers). evaluate.models names pool
    # candidates only (config_check), so the pool covers it.
    pool_backbones = {c.name: c.backbone for c in map(pool.parse, config.evaluate.candidates)}
    for model, backbone in (pool_backbones | {b: b for b in BACKBONES}).items():
        for method in results_lib.CANDIDATE_METHODS:
            inputs = {"store": store_fp, "method": method}
            if method not in ("full_data", "cold_start"):
                inputs["teacher"] = teacher["fingerprint"]  # the inherited embedding table
            if method == "diet":
                inputs["memory"] = memory_fp
            elif method in SELECTIONS:
                inputs["memory"] = out[("selection", method)]["fingerprint"]
            out[(method, model)] = fp_lib.fingerprint(
                config, "candidate", inputs, exclude=fp_lib.other_backbones(backbone)
            )
    return out


def _drop_stale_results(res: dict, records: dict) -> bool:
    """Removes results.json entries that another config produced (their fingerprint is not
    this config's), so results.json never mixes two experiments. True if any was removed."""
    kept, old = [], res.setdefault("fingerprints", {})
    for r in res["results"]:
        key = (r["method"], r["model"])
        want = records.get(key)
        if want is not None and r.get("fingerprint") == want["fingerprint"]:
            kept.append(r)
            continue
        name = f"{key[0]}/{key[1]}"
        logging.info(
            "results.json: dropping %s, computed under another config; changed: %s",
            name,
            "; ".join(fp_lib.changes(old.get(name), want or {})),
        )
        res.get("candidate_info", {}).pop(name, None)
        old.pop(name, None)
    dropped = len(kept) < len(res["results"])
    res["results"] = kept
    if dropped:
        res["fidelity"] = {}  # recomputed from the kept and new entries
    return dropped


def _stamp_results(res: dict, records: dict) -> None:
    """Gives every entry without one its fingerprint; the records (keys and inputs) go to
    res["fingerprints"], so that a later mismatch can name what changed."""
    prints = res.setdefault("fingerprints", {})
    for r in res["results"]:
        want = records.get((r["method"], r["model"]))
        if want is not None and "fingerprint" not in r:
            r["fingerprint"] = want["fingerprint"]
            prints[f"{r['method']}/{r['model']}"] = {"keys": want["keys"], "inputs": want["inputs"]}


def _selection_path(workdir: str, method: str) -> str:
    return os.path.join(workdir, "baselines", method)


def _drop_stale_selections(workdir: str, records: dict) -> None:
    from diet_jax.evaluate.methods import SELECTIONS

    for method in SELECTIONS:
        path = _selection_path(workdir, method)
        record = records[("selection", method)]
        if os.path.exists(path) and not checkpoint.valid(path, record, f"{method} rows"):
            checkpoint.discard(path)


def _stamp_selections(workdir: str, records: dict) -> None:
    """Stamps the selection rows that run_all wrote (those without a stamp yet)."""
    from diet_jax.evaluate.methods import SELECTIONS

    for method in SELECTIONS:
        path = _selection_path(workdir, method)
        if checkpoint.exists(path) and checkpoint.read_stamp(path) is None:
            checkpoint.stamp(path, records[("selection", method)])
