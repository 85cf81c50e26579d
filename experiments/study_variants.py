"""DIET variants against Random on the validation day, through the real pipeline.

    python experiments/study_variants.py --base=/tmp/full/run --root=/tmp/variants \\
        --models=dcn,dcnv2,finalnet,dcn_narrow,finalmlp_small \\
        --variant="balanced:" --variant="proportional:distill.group_split=proportional"

`--base`: a finished default run (its store, teacher and Random rows are reused: the workdir is
copied, so the base run is never touched). Each `--variant` is "name:key=value[;key=value...]"
of config overrides (strings unquoted, as on the command line); it runs `diet_jax.main` with methods (diet, random) on `--models`, which
recomputes only what the overrides change (fingerprints), and reads the candidates' validation
AUC from results.json's candidate_info: for each seed, the best epoch's AUC on the reduced rows
at the chosen learning rate (before the fine-tune; the test day is never read). Prints
DIET - Random per model (mean and std over seeds, paired by seed) and writes
`<root>/variants.json`.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from absl import app, flags

from diet_jax.io_utils import atomic_write_json, atomic_write_text

_BASE = flags.DEFINE_string("base", None, "A finished default run to copy.", required=True)
_ROOT = flags.DEFINE_string("root", "/tmp/variants", "Where the variants' workdirs go.")
_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Config file of the base run.")
_MODELS = flags.DEFINE_list("models", ["dcn", "dcnv2", "finalnet"], "Candidates to train.")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "name:key=value;key=value ...")


def val_aucs(workdir: str, method: str, model: str) -> list[float]:
    with open(os.path.join(workdir, "results.json")) as f:
        info = json.load(f)["candidate_info"][f"{method}/{model}"]
    return [float(np.nanmax(i["val_auc_per_epoch"])) for i in info]


def run_variant(name: str, overrides: list[str]) -> dict:
    workdir = os.path.join(_ROOT.value, name)
    if not os.path.exists(os.path.join(workdir, "variant.done")):
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(_BASE.value, workdir, ignore=shutil.ignore_patterns("run.lock"))
        models = "(" + "".join(f"'{m}'," for m in _MODELS.value) + ")"
        cmd = [
            sys.executable,
            "-m",
            "diet_jax.main",
            f"--config={_CONFIG.value}",
            f"--workdir={workdir}",
            f"--config.evaluate.models={models}",
            "--config.evaluate.methods=('diet','random')",
            "--config.progress=False",
            "--config.evaluate.rerun=True",
            *[f"--config.{o}" for o in overrides],
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        atomic_write_text(os.path.join(workdir, "variant.done"), "")
    out = {}
    for m in _MODELS.value:
        d, r = np.asarray(val_aucs(workdir, "diet", m)), np.asarray(val_aucs(workdir, "random", m))
        out[m] = {
            "diet": d.tolist(),
            "random": r.tolist(),
            "diff_mean": float((d - r).mean()),
            "diff_std": float((d - r).std(ddof=1)) if d.size > 1 else 0.0,
        }
    return out


def main(_):
    os.makedirs(_ROOT.value, exist_ok=True)
    table = {}
    for spec in _VARIANTS.value:
        name, _, rest = spec.partition(":")
        table[name] = run_variant(name, [o for o in rest.split(";") if o])
    models = _MODELS.value
    print("\nvalidation AUC on the reduced rows, DIET - Random (mean ± std over seeds, paired)")
    print("| variant | " + " | ".join(models) + " | mean DIET | mean diff |")
    print("|---|" + "---|" * (len(models) + 2))
    for name, rows in table.items():
        cells = [f"{rows[m]['diff_mean']:+.4f} ± {rows[m]['diff_std']:.4f}" for m in models]
        mean_diet = np.mean([np.mean(rows[m]["diet"]) for m in models])
        mean_diff = np.mean([rows[m]["diff_mean"] for m in models])
        print(f"| {name} | " + " | ".join(cells) + f" | {mean_diet:.4f} | {mean_diff:+.4f} |")
    atomic_write_json(os.path.join(_ROOT.value, "variants.json"), table)


if __name__ == "__main__":
    app.run(main)
