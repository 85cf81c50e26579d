"""Table 5: time and peak memory of full training, DIET distillation and distilled training.

    python experiments/table5.py --config=configs/synthetic.py --workdir=runs/table5

Each phase runs in its own process, so each peak is its own: on an accelerator the device's
peak bytes in use, on the CPU the process's peak resident memory (which includes Python and
JAX themselves). The data and the teacher are prepared once under --workdir and shared.

- full training: one epoch of the teacher model on the first historical stage (compile excluded)
- DIET distillation: every historical stage distilled again; minutes per stage
- distilled training: one epoch of the teacher model's dense network on the final memory
"""

import json
import os
import resource
import subprocess
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data import loader, prepare
from diet_jax.distill import driver
from diet_jax.evaluate import protocol
from diet_jax.io_utils import atomic_write_text
from diet_jax.models import build_model
from diet_jax.train import loop
from diet_jax.train.reference import train_reference
from diet_jax.train.steps import make_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/table5", "Root of the measurement (resumable).")
_PHASE = flags.DEFINE_enum(
    "phase", None, ["full", "distill", "distilled"], "Internal: one phase per process."
)


def _peak() -> dict:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return {
            "peak_gb": stats["peak_bytes_in_use"] / 2**30,
            "peak_kind": f"{dev.platform} device peak",
        }
    return {
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_kind": "process RSS",
    }


def _phase(config, root: str, phase: str) -> dict:
    config = config.copy_and_resolve_references()
    config.data.store_dir = config.data.store_dir or os.path.join(root, "shared", "data")
    config.teacher.checkpoint_dir = config.teacher.checkpoint_dir or os.path.join(
        root, "shared", "teacher"
    )
    store = prepare.prepare(config, root)
    if phase == "full":
        stage = store.stages("historical")[0]
        model = build_model(config.model, store.feature_map, name=config.teacher.model)
        trainer = make_trainer(model, config.train)
        state = trainer.init(*model.init(jax.random.key(config.seed)))
        warm = next(iter(loader.device_batches(stage, config.train.batch_size, shuffle=False)))
        state, _ = trainer.step(state, warm)  # compile outside the timed epoch
        state, stats = loop.train_epoch(
            trainer.step,
            state,
            stage,
            batch_size=config.train.batch_size,
            seed=0,
            progress=config.progress,
        )
        return {
            "minutes": stats["seconds"] / 60,
            "what": f"1 epoch on {stage.name} ({len(stage):,} rows)",
            **_peak(),
        }
    ref = train_reference(config, store, os.path.join(root, "shared"))
    if phase == "distill":
        workdir = os.path.join(root, f"distill_{int(time.time())}")
        run = driver.distill(config, store, ref, workdir)
        return {
            "minutes": run.seconds / 60 / len(run.stage_names),
            "what": f"per stage, mean of {len(run.stage_names)}",
            **_peak(),
        }
    mem = driver.load_final(_latest_distill(root))
    cfg = config.copy_and_resolve_references()
    cfg.evaluate.max_epochs = 1
    model = build_model(config.model, store.feature_map, name=config.teacher.model)
    _, _, info, seconds, _ = protocol.train_on_rows(
        model, ref.final.params["embed"], mem.trainable(), store, cfg, config.seed
    )
    return {"minutes": seconds / 60, "what": f"1 epoch on {len(mem):,} distilled rows", **_peak()}


def _latest_distill(root: str) -> str:
    runs = sorted(d for d in os.listdir(root) if d.startswith("distill_"))
    if not runs:
        raise FileNotFoundError(f"No distillation under {root}; run the distill phase first.")
    return os.path.join(root, runs[-1])


def main(argv):
    config, root = _CONFIG.value, _WORKDIR.value
    if _PHASE.value:
        print("TABLE5 " + json.dumps(_phase(config, root, _PHASE.value)))
        return
    os.makedirs(root, exist_ok=True)
    args = [a for a in sys.argv[1:] if not a.startswith("--phase")]
    rows = {}
    for phase, label in (
        ("full", "Full training"),
        ("distill", "DIET distillation"),
        ("distilled", "Distilled training"),
    ):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *args, f"--phase={phase}"],
            capture_output=True,
            text=True,
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("TABLE5 ")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-3000:]}")
        rows[label] = json.loads(line[-1][len("TABLE5 ") :])
    lines = ["| Phase | Time (min) | Peak memory (GB) | measured as |", "|---|---|---|---|"]
    lines += [
        f"| {k} | {v['minutes']:.3f} | {v['peak_gb']:.2f} ({v['peak_kind']}) | {v['what']} |"
        for k, v in rows.items()
    ]
    text = f"## Table 5 ({jax.devices()[0].device_kind})\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(root, "table5.md"), text)
    print(text)


if __name__ == "__main__":
    app.run(main)
