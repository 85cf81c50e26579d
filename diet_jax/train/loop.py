"""Epoch loops around the jitted steps: training over a stage, prediction, evaluation."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from diet_jax import metrics, parallel
from diet_jax.data import loader
from diet_jax.data.store import Stage
from diet_jax.io_utils import MetricsWriter


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss or gradient norm stopped a phase (train.nan_policy = "stop")."""


def nonfinite_message(phase: str, stage: str | None, step: int, checkpoint: str | None) -> str:
    where = f"phase {phase}" + (f", stage {stage}" if stage else "") + f", step {step}"
    kept = checkpoint or "none (this phase starts from scratch on a rerun)"
    return (
        f"Non-finite loss or gradient norm in {where}: the phase stopped. "
        f"Last good checkpoint (kept): {kept}. Lower the learning rate, check the data, or set "
        "train.nan_policy='skip_batch' to skip such batches."
    )


class NonFiniteTracker:
    """Keeps each step's `finite` flag (a device scalar the step already returns: no extra
    dispatch); `check()`, at a logging interval, reads the flags back in one transfer and
    raises NonFiniteError (stop policy) or counts the skipped steps (skip_batch)."""

    def __init__(self, phase: str, stage: str | None = None, checkpoint: str | None = None):
        self.phase, self.stage, self.checkpoint = phase, stage, checkpoint
        self.flags: list = []
        self.steps: list[int] = []
        self.skipping = False
        self.skipped = 0

    def add(self, step_metrics: dict, step: int) -> None:
        finite = step_metrics.get("finite")
        if finite is None:  # a step without the flag: its loss alone
            finite = jnp.isfinite(step_metrics.get("loss", step_metrics.get("meta_loss")))
        self.skipping = self.skipping or "skipped" in step_metrics
        self.flags.append(finite)
        self.steps.append(step)

    def check(self) -> None:
        if not self.flags:
            return
        finite = np.asarray(jax.device_get(self.flags), bool).reshape(-1)
        bad = [s for s, ok in zip(self.steps, finite, strict=True) if not ok]
        self.flags, self.steps = [], []
        if not bad:
            return
        if not self.skipping:
            raise NonFiniteError(nonfinite_message(self.phase, self.stage, bad[0], self.checkpoint))
        self.skipped += len(bad)
        logging.warning(
            "%s%s: skipped %d batch(es) with a non-finite loss or gradient norm (steps %s; "
            "train.nan_policy='skip_batch'), %d in all.",
            self.phase,
            f" {self.stage}" if self.stage else "",
            len(bad),
            bad[:10],
            self.skipped,
        )


def train_epoch(
    train_step,
    state,
    stage: Stage,
    *,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    desc: str = "train",
    writer: MetricsWriter | None = None,
    log_every: int = 50,
    progress: bool = True,
    log_fields: dict | None = None,
    sharding=None,
    phase: str | None = None,
    last_checkpoint: str | None = None,
):
    """One shuffled pass over `stage`. Returns (state, {"seconds", "samples", "steps", "loss",
    "skipped"}).

    Metrics are read one step behind the dispatch, so the host never waits on the device inside
    the loop except to print. The step's non-finite flags are collected on the device and read
    at every logging interval: under train.nan_policy = "stop" a NaN/Inf loss or gradient norm
    raises NonFiniteError naming `phase` (default "training (<desc>)"), the stage, the step and
    `last_checkpoint`. `sharding`: batches split over a mesh (`parallel.batch_sharding`), the
    state already placed on it.
    """
    n_batches = loader.num_batches(len(stage), batch_size, drop_remainder=True)
    if n_batches == 0:
        raise ValueError(
            f"Stage {stage.name!r} has {len(stage)} rows, fewer than one batch of {batch_size}."
        )
    batches = loader.device_batches(
        stage,
        batch_size,
        shuffle=True,
        seed=seed,
        epoch=epoch,
        drop_remainder=True,
        sharding=sharding,
    )
    tracker = NonFiniteTracker(phase or f"training ({desc})", stage.name, last_checkpoint)
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress, leave=False)
    start = time.perf_counter()
    pending, last_loss = None, float("nan")
    for i, batch in enumerate(batches):
        state, step_metrics = train_step(state, batch)
        tracker.add(step_metrics, i)
        if pending is not None and (i % log_every == 0):
            tracker.check()
            last_loss = float(pending["loss"])
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if writer is not None:
                writer.write(phase=desc, step=i - 1, loss=last_loss, **(log_fields or {}))
        pending = step_metrics
        bar.update(1)
    tracker.check()
    last_loss = float(pending["loss"])
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    bar.close()
    return state, {
        "seconds": seconds,
        "samples": n_batches * batch_size,
        "steps": n_batches,
        "loss": last_loss,
        "skipped": tracker.skipped,
    }


def predict(
    predict_step, params, model_state, stage: Stage, batch_size: int, sharding=None
) -> np.ndarray:
    """Logits of every row of `stage`, [N, K], in row order (on every process).

    Batches of `loader.padded_batch_size` (a divisor of batch_size that pads the stage least):
    logits do not depend on the batch, and padding rows would be computed for nothing."""
    outs = []
    devices = 1 if sharding is None else len(sharding.device_set)
    batch_size = loader.padded_batch_size(len(stage), batch_size, devices)
    batches = loader.device_batches(
        stage, batch_size, shuffle=False, drop_remainder=False, sharding=sharding
    )
    for batch in batches:
        outs.append(predict_step(params, model_state, batch["x"]))
    if sharding is not None:  # gathered batch by batch: other hosts' rows are not addressable
        return np.concatenate([parallel.to_host(o) for o in outs])[: len(stage)]
    return np.asarray(jnp.concatenate(outs))[: len(stage)]


def precise_batch_stats(
    batch_stats_step, params, model_state, stage: Stage, batch_size: int, sharding=None
):
    """model_state with every BatchNorm running statistic replaced by its mean over the whole
    batches of `stage` ("precise BN"): after a short fine-tune the running averages still
    remember what the model trained on before it (momentum 0.9 keeps 0.9^steps of it), rows that
    need not look like real data. The mean of the batch variances, as the running average
    estimates it; full batches only, so that padding never enters a statistic."""
    if not jax.tree.leaves(model_state):
        return model_state
    batch_size = min(batch_size, len(stage))
    total, n = None, 0
    for batch in loader.device_batches(
        stage, batch_size, shuffle=False, drop_remainder=True, sharding=sharding
    ):
        b = batch_stats_step(params, model_state, batch["x"])
        total = b if total is None else jax.tree.map(jnp.add, total, b)
        n += 1
    if n == 0:
        return model_state
    return jax.tree.map(lambda t: t / n, total)


def evaluate(
    predict_step, params, model_state, stage: Stage, batch_size: int, tasks, sharding=None
) -> dict:
    """Mean and per-task AUC and LogLoss over the whole stage."""
    logits = predict(predict_step, params, model_state, stage, batch_size, sharding)
    return metrics.multitask_metrics(np.asarray(stage.y_NxK), logits, list(tasks))
