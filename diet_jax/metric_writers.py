"""TensorBoard event files beside metrics.jsonl: `<workdir>/tensorboard/`.

    tensorboard --logdir <workdir>/tensorboard

Every record the run writes to metrics.jsonl (`io_utils.MetricsWriter`) becomes scalars here:
its numeric fields, tagged `<phase>/<stage, split, method, model...>/<field>`. The step is the
record's `step` or `iteration` (training losses, distillation iterations); a record without one
but with a `stage` (per-stage summaries: teacher validation AUC, distillation seconds) is
plotted against the stage's number, 1, 2, ... in the order the run met them; any other record
against how many of its tag came before. So the distillation's meta loss and hard-target AUC
are `distill/stage_1/meta_loss`, `distill/stage_1/hard_auc`, ..., the teacher's training loss
`teacher/stage_1/loss`, its validation AUC `teacher_stage/val_auc`, a candidate's test AUC
`candidate/diet/dcn/auc`.

The writer is tensorboardX (a dependency of diet_jax, light: numpy and protobuf). Without it the
run writes metrics.jsonl only and says so once. DIET_JAX_TENSORBOARD=0 turns it off.
"""

from __future__ import annotations

import math
import numbers
import os
import re

from absl import logging

DIRNAME = "tensorboard"
_STEP_KEYS = ("step", "iteration")
_WARNED = []


def enabled() -> bool:
    return os.environ.get("DIET_JAX_TENSORBOARD", "1") not in ("0", "false", "False", "")


def _tag_part(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(s)).strip("_") or "_"


class TensorBoardWriter:
    """Turns metrics records into TensorBoard scalars; `write(record)`, `close()`."""

    def __init__(self, logdir: str):
        import tensorboardX  # noqa: F401  (ImportError now, not at the first record)

        self.logdir = logdir
        self._writer = None  # opened at the first record: no empty event files
        self._stage_index: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    def scalars(self, record: dict) -> tuple[str, int, dict[str, float]]:
        """(tag prefix, step, {field: value}) of one record: what `write` logs."""
        phase = str(record.get("phase", "metrics"))
        words = phase.split()
        parts = [_tag_part(w) for w in words]
        step = next((record[k] for k in _STEP_KEYS if isinstance(record.get(k), int)), None)
        values, labels = {}, []
        for key, v in record.items():
            if key == "phase" or key in _STEP_KEYS:
                continue
            if isinstance(v, str):
                labels.append((key, v))
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                if math.isfinite(float(v)):
                    values[key] = float(v)
        for key, v in labels:
            if key == "stage" and step is None:  # per-stage summaries: against the stage number
                step = self._stage_index.setdefault(v, len(self._stage_index) + 1)
            elif v not in words and _tag_part(v) not in parts:  # backbone == candidate name
                parts.append(_tag_part(v))
        prefix = "/".join(parts)
        if step is None:
            step = self._counts.get(prefix, 0)
            self._counts[prefix] = step + 1
        return prefix, int(step), values

    def write(self, record: dict) -> None:
        prefix, step, values = self.scalars(record)
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=10)
        for key, v in values.items():
            self._writer.add_scalar(f"{prefix}/{key}", v, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def create(workdir: str) -> TensorBoardWriter | None:
    """The workdir's TensorBoard writer, or None (turned off, or tensorboardX missing)."""
    if not enabled():
        return None
    try:
        return TensorBoardWriter(os.path.join(workdir, DIRNAME))
    except ImportError:
        if not _WARNED:
            _WARNED.append(True)
            logging.warning(
                "TensorBoard event files are off: tensorboardX is not installed "
                "(pip install tensorboardX); metrics.jsonl is written as usual."
            )
        return None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under `logdir` (tests, notebooks)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + n]
            pos += 12 + n + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
