"""Study: the teacher's validation AUC against its Adam rate (the choice of train.learning_rate).

    nice -n 10 python experiments/study_teacher_lr.py --workdir=runs/synthetic \
        --out=/tmp/study_teacher_lr --rates=1e-3,3e-3,1e-2,2e-2

Trains the teacher (one epoch per historical stage, as the pipeline does) at every rate on the
stage store of a finished run (`<workdir>/data`, only read), each in `<out>/<rate>` (a rerun
restores finished teachers), and prints the final teacher's AUC on the validation day. The test
day is not read. Measured on the default synthetic stream: 0.6658 / 0.6721 / 0.6809 / 0.6481 at
1e-3 / 3e-3 / 1e-2 / 2e-2 (docs/evaluation.md, "Learning rates and the fine-tune").
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from diet_jax.data.store import StageStore
from diet_jax.io_utils import atomic_write_json
from diet_jax.models import build_model
from diet_jax.train import loop
from diet_jax.train.reference import train_reference
from diet_jax.train.steps import make_predict_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "The run's config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "A run whose stage store is used.")
_OUT = flags.DEFINE_string("out", "/tmp/study_teacher_lr", "Where the teachers are written.")
_RATES = flags.DEFINE_list("rates", ["1e-3", "3e-3", "1e-2", "2e-2"], "Adam rates to try.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    store = StageStore(os.path.join(_WORKDIR.value, "data"))
    out = {}
    for rate in _RATES.value:
        config = _CONFIG.value.copy_and_resolve_references()
        config.train.learning_rate = float(rate)
        config.progress = False
        ref = train_reference(config, store, os.path.join(_OUT.value, rate))
        model = build_model(config.model, store.feature_map, name=config.teacher.model)
        val = loop.evaluate(
            make_predict_step(model),
            ref.final.params,
            ref.final.model_state,
            store.stages("validation")[0],
            config.train.eval_batch_size,
            store.feature_map.tasks,
        )
        out[rate] = float(val["auc"])
        print(f"train.learning_rate {rate}: teacher validation AUC {out[rate]:.4f}", flush=True)
    atomic_write_json(os.path.join(_OUT.value, "study_teacher_lr.json"), out)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
