"""The reference (teacher) model, trained continually: phi_t = Update(phi_{t-1}, D_t).

One epoch per historical stage in time order; parameters and optimizer moments are inherited;
every stage's state is saved with Orbax under `<workdir>/teacher/stage_<t>`; a rerun restores
finished stages instead of training them again. Each stage is stamped with the teacher's
fingerprint (`fingerprint.KEYS["teacher"]` and the store's): a stage whose stamp differs, or
whose files are damaged, is trained again from the previous good stage.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from diet_jax import checkpoint, parallel
from diet_jax import fingerprint as fp_lib
from diet_jax.data.store import StageStore
from diet_jax.io_utils import MetricsWriter
from diet_jax.models import build_model
from diet_jax.models.factory import RecModel
from diet_jax.train import loop
from diet_jax.train.steps import TrainState, make_predict_step, make_trainer


@dataclasses.dataclass
class ReferenceRun:
    model: RecModel
    final: TrainState  # phi_T
    stage_names: list[str]  # historical stages, in time order
    root: str  # teacher_root(config, workdir)
    train_seconds: float  # time spent training in this run (0 when everything was restored)
    train_samples: int
    restored: list[str]  # stages found on disk and skipped
    fingerprint: str = ""  # of every stage: teacher keys and the store's fingerprint

    def stage_state(self, t: int) -> TrainState:
        """phi_t (1-based), read back from its checkpoint: the live state is donated step by step."""
        if not 1 <= t <= len(self.stage_names):
            raise ValueError(f"No teacher stage {t}; stages are 1..{len(self.stage_names)}.")
        return checkpoint.restore(checkpoint_dir(self.root, t), self.final)


def teacher_root(config, workdir: str) -> str:
    """Where the stage checkpoints live: `teacher.checkpoint_dir`, or <workdir>/teacher.

    Runs that differ only after the teacher (another ratio, another ablation) can share one.
    """
    return config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")


def checkpoint_dir(root: str, t: int) -> str:
    return os.path.join(root, f"stage_{t:02d}")


def teacher_fingerprint(config, store_fp: str | None) -> dict:
    """The record every teacher stage is stamped with (`store_fp`: the store's fingerprint)."""
    return fp_lib.fingerprint(
        config,
        "teacher",
        {"store": store_fp},
        # The evaluation batch only sizes the teacher's validation passes.
        exclude=fp_lib.other_backbones(config.teacher.model) + ("train.eval_batch_size",),
    )


def _restore(path: str, state, record: dict, name: str):
    """The stage's state, or None when it must be trained (missing, out of date, damaged)."""
    if not checkpoint.valid(path, record, f"teacher {name}"):
        return None
    try:
        return checkpoint.restore(path, state)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
        logging.warning("teacher %s at %s cannot be read (%s): training it again", name, path, e)
        return None


def train_reference(
    config, store: StageStore, workdir: str, writer: MetricsWriter | None = None
) -> ReferenceRun:
    fmap = store.feature_map
    record = teacher_fingerprint(config, getattr(store, "fingerprint", None))
    model = build_model(config.model, fmap, name=config.teacher.model)
    # Dense or row-sparse embedding updates, as train.embedding_optimizer asks.
    trainer = make_trainer(model, config.train, phase="teacher")
    params, model_state = model.init(jax.random.key(config.seed))
    state = trainer.init(params, model_state)
    # Scale-out: batches split over the mesh's data axis, the state replicated (table row-sharded
    # on request); checkpoints restore into the same layout, since `state` is their template.
    mesh = parallel.mesh_from_config(config)
    if mesh is not None:
        shard = config.parallel.shard_embeddings
        state = parallel.put(state, parallel.state_shardings(state, mesh, shard_embeddings=shard))
    rows = parallel.batch_sharding(mesh)
    train_step = trainer.step
    predict_step = make_predict_step(model)
    validation = store.stages("validation")[0]

    names, restored = [], []
    seconds, samples = 0.0, 0
    previous_path = None  # the last good checkpoint, named if a NaN stops the stage
    for t, info in enumerate(fmap.stages_with_role("historical"), start=1):
        path = checkpoint_dir(teacher_root(config, workdir), t)
        found = _restore(path, state, record, info.name)
        if found is not None:
            state = found
            restored.append(info.name)
            logging.info("teacher: restored %s from %s", info.name, path)
        else:
            checkpoint.discard(path)
            state, stats = loop.train_epoch(
                train_step,
                state,
                store.stage(info.name),
                batch_size=config.train.batch_size,
                seed=config.seed,
                epoch=t,
                desc=f"teacher {info.name}",
                writer=writer,
                log_every=config.train.log_every,
                progress=config.progress,
                log_fields={"stage": info.name},
                sharding=rows,
                phase="teacher",
                last_checkpoint=previous_path,
            )
            seconds += stats["seconds"]
            samples += stats["samples"]
            val = loop.evaluate(
                predict_step,
                state.params,
                state.model_state,
                validation,
                config.train.eval_batch_size,
                fmap.tasks,
                sharding=rows,
            )
            if writer is not None:
                writer.write(
                    phase="teacher_stage",
                    stage=info.name,
                    seconds=stats["seconds"],
                    samples=stats["samples"],
                    samples_per_second=stats["samples"] / stats["seconds"],
                    train_loss=stats["loss"],
                    val_auc=val["auc"],
                    val_logloss=val["logloss"],
                )
            logging.info(
                "teacher %s: %.1f samples/s, val AUC %.4f",
                info.name,
                stats["samples"] / stats["seconds"],
                val["auc"],
            )
            checkpoint.save(path, state, record)
        previous_path = path
        names.append(info.name)
    return ReferenceRun(
        model,
        state,
        names,
        teacher_root(config, workdir),
        seconds,
        samples,
        restored,
        record["fingerprint"],
    )
