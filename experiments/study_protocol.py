"""Study: protocol settings of the candidate evaluation, compared on the validation day.

    nice -n 10 python experiments/study_protocol.py --base=runs/synthetic --out=/tmp/study_protocol

`--base`: a finished run of the default synthetic config (its workdir is copied per arm, never
written). Every arm reruns the reduced methods (`--methods`) over `--models` with its config
overrides (`ARMS`) on the copy, reusing the base run's store, teacher and distilled memory
(`evaluate.rerun=True`); Full Data is rerun once, in the first arm, so that every entry has the
final model's validation AUC. Prints, per arm, the pool-mean AUC of each method on the validation
and the test day and Kendall's tau against Full Data (the day of each), and writes
<out>/study_protocol.json. Settings are chosen on the validation columns; the test day only
reports. A rerun skips finished arms (delete <out>/<arm> to redo one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diet_jax.evaluate import fidelity  # noqa: E402
from diet_jax.io_utils import atomic_write_json  # noqa: E402

MODELS = "wukong,wukong_small,wukong_mid,finalnet,finalnet_1b,finalnet_relu,dcn,dcnv2"
# arm -> config overrides (on top of the base run's config file and `--overrides`).
ARMS = {
    "before": {"evaluate.finetune_adam": "fresh", "evaluate.precise_bn": "False"},
    "continued_adam": {"evaluate.finetune_adam": "rows", "evaluate.precise_bn": "False"},
    "rows_lr": {
        "evaluate.finetune_adam": "fresh",
        "evaluate.finetune_lr": "rows",
        "evaluate.precise_bn": "False",
    },
    "continued_adam_rows_lr": {
        "evaluate.finetune_adam": "rows",
        "evaluate.finetune_lr": "rows",
        "evaluate.precise_bn": "False",
    },
    "precise_bn": {"evaluate.finetune_adam": "fresh", "evaluate.precise_bn": "True"},
    "continued_adam_precise_bn": {"evaluate.finetune_adam": "rows", "evaluate.precise_bn": "True"},
}


def run_arm(base: str, out: str, arm: str, overrides: dict, models: str, methods: str, config):
    work = os.path.join(out, arm, "run")
    done = os.path.join(out, arm, "done")
    if os.path.exists(done):
        return work
    shutil.rmtree(os.path.join(out, arm), ignore_errors=True)
    shutil.copytree(base, work)
    tuple_of = lambda names: "(" + "".join(f"'{n}'," for n in names.split(",")) + ")"  # noqa: E731
    cmd = [
        sys.executable,
        "-m",
        "diet_jax.main",
        f"--config={config}",
        f"--workdir={work}",
        "--config.evaluate.rerun=True",
        f"--config.evaluate.models={tuple_of(models)}",
        f"--config.evaluate.methods={tuple_of(methods)}",
        "--config.progress=False",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]
    log = os.path.join(out, arm, "log.txt")
    print(f"{arm}: {' '.join(cmd[3:])}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"arm {arm} failed (exit {rc}); see {log}")
    open(done, "w").close()
    return work


def summarize(work: str, full_data: list[dict]) -> dict:
    res = json.load(open(os.path.join(work, "results.json")))
    rows = [r for r in res["results"] if r["method"] not in ("reference", "full_data")]
    rows += full_data
    by = {(r["method"], r["model"]): r for r in rows}
    models = sorted({r["model"] for r in rows if r["method"] != "full_data"})
    out = {}
    for day in ("val_auc", "auc"):
        fd = [np.mean([p[day] for p in by[("full_data", m)]["per_seed"]]) for m in models]
        for meth in sorted({r["method"] for r in rows}):
            v = [np.mean([p[day] for p in by[(meth, m)]["per_seed"]]) for m in models]
            out.setdefault(meth, {})[day] = {"pool_mean": float(np.mean(v))}
            out[meth][day]["kendall"] = fidelity.kendall(v, fd)
    return {"candidates": models, "methods": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="a finished run's workdir")
    p.add_argument("--out", default="/tmp/study_protocol")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.py"))
    p.add_argument("--models", default=MODELS)
    p.add_argument("--methods", default="random,kmeans,diet")
    p.add_argument("--arms", default=",".join(ARMS))
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.base, "results.json")):
        raise SystemExit(f"{args.base} is not a finished run (no results.json).")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"Unknown arms {unknown}; available: {', '.join(ARMS)}.")
    os.makedirs(args.out, exist_ok=True)
    summary, full_data = {}, None
    for i, arm in enumerate(arms):
        methods = ("full_data," if i == 0 else "") + args.methods
        work = run_arm(args.base, args.out, arm, ARMS[arm], args.models, methods, args.config)
        if full_data is None:
            res = json.load(open(os.path.join(work, "results.json")))
            full_data = [r for r in res["results"] if r["method"] == "full_data"]
        summary[arm] = summarize(work, full_data)
    atomic_write_json(os.path.join(args.out, "study_protocol.json"), summary)
    meths = ["full_data", *args.methods.split(",")]
    print(
        "\n| arm | "
        + " | ".join(f"{m} val / test (tau val)" for m in meths)
        + " |\n|---|"
        + "---|" * len(meths)
    )
    for arm, s in summary.items():
        cells = [
            f"{s['methods'][m]['val_auc']['pool_mean']:.4f} / {s['methods'][m]['auc']['pool_mean']:.4f}"
            f" ({s['methods'][m]['val_auc']['kendall']:.2f})"
            for m in meths
        ]
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
