"""Epoch loops around the jitted steps: training over a stage, prediction, evaluation."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diet_jax import metrics, parallel
from diet_jax.data import loader
from diet_jax.data.store import Stage
from diet_jax.io_utils import MetricsWriter


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
):
    """One shuffled pass over `stage`. Returns (state, {"seconds", "samples", "steps", "loss"}).

    Metrics are read one step behind the dispatch, so the host never waits on the device inside
    the loop except to print; a non-finite loss stops the run. `sharding`: batches split over a
    mesh (`parallel.batch_sharding`), the state already placed on it.
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
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress, leave=False)
    start = time.perf_counter()
    pending, last_loss = None, float("nan")
    for i, batch in enumerate(batches):
        state, step_metrics = train_step(state, batch)
        if pending is not None and (i % log_every == 0):
            last_loss = _check_finite(float(pending["loss"]), desc, i - 1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if writer is not None:
                writer.write(phase=desc, step=i - 1, loss=last_loss, **(log_fields or {}))
        pending = step_metrics
        bar.update(1)
    last_loss = _check_finite(float(pending["loss"]), desc, n_batches - 1)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    bar.close()
    return state, {
        "seconds": seconds,
        "samples": n_batches * batch_size,
        "steps": n_batches,
        "loss": last_loss,
    }


def _check_finite(value: float, desc: str, step: int) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"{desc}: loss became {value} at step {step}.")
    return value


def predict(
    predict_step, params, model_state, stage: Stage, batch_size: int, sharding=None
) -> np.ndarray:
    """Logits of every row of `stage`, [N, K], in row order (on every process)."""
    outs = []
    batches = loader.device_batches(
        stage, batch_size, shuffle=False, drop_remainder=False, sharding=sharding
    )
    for batch in batches:
        outs.append(predict_step(params, model_state, batch["x"]))
    if sharding is not None:  # gathered batch by batch: other hosts' rows are not addressable
        return np.concatenate([parallel.to_host(o) for o in outs])[: len(stage)]
    return np.asarray(jnp.concatenate(outs))[: len(stage)]


def evaluate(
    predict_step, params, model_state, stage: Stage, batch_size: int, tasks, sharding=None
) -> dict:
    """Mean and per-task AUC and LogLoss over the whole stage."""
    logits = predict(predict_step, params, model_state, stage, batch_size, sharding)
    return metrics.multitask_metrics(np.asarray(stage.y_NxK), logits, list(tasks))
