"""DIET variants against Random on the validation day, through the real pipeline.

    python experiments/study_variants.py --base=/tmp/full/run --root=/tmp/variants \\
        --models=dcn,dcnv2,finalnet,dcn_narrow,finalmlp_small \\
        --variant="balanced:" --variant="proportional:distill.group_split=proportional"

    python experiments/study_variants.py --base=/tmp/full/run --root=/tmp/ranking --models=all \\
        --methods=diet --variant="proportional:distill.group_split=proportional"

`--base`: a finished default run (its store, teacher and Random rows are reused: the workdir is
copied, so the base run is never touched). Each `--variant` is "name:key=value[;key=value...]"
of config overrides (strings unquoted, as on the command line); it runs `diet_jax.main` with `--methods` (default diet, random) on `--models` (`all`: the
whole pool), which
recomputes only what the overrides change (fingerprints), and reads the candidates' validation
AUC from results.json's candidate_info: for each seed, the best epoch's AUC on the reduced rows
at the chosen learning rate (before the fine-tune; the test day is never read). Prints
DIET - Random per model (mean and std over seeds, paired by seed) and writes
`<root>/variants.json`.

With `--models=all` it also prints how each variant (and the base run, as `base`) ranks the
pool on the validation day (`fidelity.on_validation_day`: every entry's final model after
the fine-tune): DIET's pool-mean AUC, Kendall tau against Full Data with its bootstrap interval,
DIET's seed agreement and the bases on which DIET beats Random. Entries a variant did not rerun
(Full Data, Random, ...) are the base run's.
"""

import os
import shutil
import subprocess
import sys

import fidelity_check
import numpy as np
from absl import app, flags

from diet_jax import results
from diet_jax.evaluate import fidelity
from diet_jax.io_utils import atomic_write_json, atomic_write_text

_BASE = flags.DEFINE_string("base", None, "A finished default run to copy.", required=True)
_ROOT = flags.DEFINE_string("root", "/tmp/variants", "Where the variants' workdirs go.")
_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Config file of the base run.")
_MODELS = flags.DEFINE_list(
    "models", ["dcn", "dcnv2", "finalnet"], "Candidates to train; 'all' = the whole pool."
)
_METHODS = flags.DEFINE_list("methods", ["diet", "random"], "Methods each variant reruns.")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "name:key=value;key=value ...")


def val_aucs(workdir: str, method: str, model: str) -> list[float]:
    if method not in _METHODS.value:  # not rerun: the base run's entry
        workdir = _BASE.value
    info = results.read(os.path.join(workdir, "results.json"))["candidate_info"][
        f"{method}/{model}"
    ]
    return [float(np.nanmax(i["val_auc_per_epoch"])) for i in info]


def _whole_pool() -> bool:
    return _MODELS.value == ["all"]


def _models(workdir: str) -> list[str]:
    if not _whole_pool():
        return _MODELS.value
    rows = results.read(os.path.join(workdir, "results.json"))["results"]
    return list(dict.fromkeys(r["model"] for r in rows if r["method"] == "diet"))


def ranking(workdir: str) -> dict:
    """How DIET ranks the pool on the validation day, against Full Data. Entries of the methods
    the variant did not rerun are read from the base run's results.json (so a variant may start
    from a copy of a base run that was still running)."""
    res = results.read(os.path.join(_BASE.value, "results.json"))
    if os.path.abspath(workdir) != os.path.abspath(_BASE.value):
        rows = results.read(os.path.join(workdir, "results.json"))["results"]
        mine = [r for r in rows if r["method"] in _METHODS.value]
        res["results"] = [r for r in res["results"] if r["method"] not in _METHODS.value] + mine
    val = fidelity.on_validation_day(res)
    card = fidelity_check.scorecard(val)
    fid, wins = card["fidelity"], card["per_backbone"]
    diet_BxS = np.asarray(
        [[p["auc"] for p in r["per_seed"]] for r in val["results"] if r["method"] == "diet"]
    )
    return {
        "diet_pool_auc": card["pool"]["diet"]["auc"],
        # The pool mean of each seed (seed k of every candidate), for differences paired by seed.
        "diet_pool_auc_per_seed": diet_BxS.mean(axis=0).tolist(),
        "random_pool_auc": card["pool"].get("random", {}).get("auc", float("nan")),
        # NaN when no Full Data entry is at hand (a base that is itself a variant of a run).
        "diet_kendall": fid.get("diet", {}).get("kendall", float("nan")),
        "diet_kendall_ci": fid.get("diet", {}).get("kendall_ci"),
        "random_kendall": fid.get("random", {}).get("kendall", float("nan")),
        "diet_seed_kendall": card["seed_kendall"].get("diet", float("nan")),
        "diet_wins": sum(v["diff"] > 0 for v in wins.values()),
        "bases": len(wins),
    }


def run_variant(name: str, overrides: list[str]) -> dict:
    workdir = os.path.join(_ROOT.value, name)
    if not os.path.exists(os.path.join(workdir, "variant.done")):
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(_BASE.value, workdir, ignore=shutil.ignore_patterns("run.lock"))
        models = "()" if _whole_pool() else "(" + "".join(f"'{m}'," for m in _MODELS.value) + ")"
        methods = "(" + "".join(f"'{m}'," for m in _METHODS.value) + ")"
        cmd = [
            sys.executable,
            "-m",
            "diet_jax.main",
            f"--config={_CONFIG.value}",
            f"--workdir={workdir}",
            f"--config.evaluate.models={models}",
            f"--config.evaluate.methods={methods}",
            "--config.progress=False",
            "--config.evaluate.rerun=True",
            *[f"--config.{o}" for o in overrides],
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        atomic_write_text(os.path.join(workdir, "variant.done"), "")
    out = {}
    for m in _models(workdir):
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
    models = _models(os.path.join(_ROOT.value, next(iter(table)))) if table else _MODELS.value
    if _whole_pool():
        ranks = {"base": ranking(_BASE.value)}
        ranks.update({n: ranking(os.path.join(_ROOT.value, n)) for n in table})
        print("\nranking of the pool on the validation day (final models, after the fine-tune)")
        print(
            "| variant | DIET pool-mean AUC | Random pool-mean AUC | DIET Kendall tau vs Full Data "
            "[95% CI] | Random's tau | DIET seed agreement | DIET > Random on bases |"
        )
        print("|---|---|---|---|---|---|---|")
        for n, r in ranks.items():
            ci = r["diet_kendall_ci"]
            ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            print(
                f"| {n} | {r['diet_pool_auc']:.4f} | {r['random_pool_auc']:.4f} | "
                f"{r['diet_kendall']:.3f}{ci} | {r['random_kendall']:.3f} | "
                f"{r['diet_seed_kendall']:.2f} | {r['diet_wins']} of {r['bases']} |"
            )
        atomic_write_json(os.path.join(_ROOT.value, "ranking.json"), ranks)
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
