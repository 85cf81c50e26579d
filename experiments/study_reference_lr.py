"""Study: does Full Data's single learning rate hide the pool's ranking?

    nice -n 10 python experiments/study_reference_lr.py --workdir=runs/synthetic \
        --out=/tmp/study_reference_lr
    python experiments/study_reference_lr.py --workdir=R/final3 --fill_from=runs/synthetic \
        --grid=1e-3,3e-3,1e-2,2e-2 --out=/tmp/study_reference_lr_final3

The default protocol trains Full Data at train.learning_rate (1e-2) while every reduced method
picks its rate from evaluate.lr_grid on validation (docs/evaluation.md, deviation 2); the paper
tunes every model (5.1.4). This script reruns Full Data over the pool of a finished run with
evaluate.reference_lr_grid (the paper's grid by default; the rate chosen on the validation day,
first seed, as the reduced methods'), reusing the run's stage store and teacher, and recomputes
every method's Kendall tau and Spearman (with their bootstrap intervals) against it, next to the
run's own figures against the untuned Full Data, on the test day and on the validation day (the
final models' validation AUCs). The run's results.json is only read.

Writes <out>/full_data_tuned.jsonl (one entry per candidate; a rerun resumes), <out>/summary.json
and <out>/results.json (the run's results with the tuned Full Data as `full_data`:
`experiments/fidelity_check.py --workdir=<out>` scores it, and `--replicates=<out2>,<out3>` pools
the studies of replicate runs); prints markdown tables. The test day enters only as the reported
AUCs, exactly as in the run itself: the rate is chosen on validation.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from diet_jax import io_utils, results
from diet_jax.data import prepare
from diet_jax.evaluate import fidelity, methods, pool, protocol
from diet_jax.io_utils import atomic_write_json
from diet_jax.train.reference import train_reference

io_utils.enable_compilation_cache()

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "The config the run in --workdir was made with."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "A finished run's workdir.")
_OUT = flags.DEFINE_string("out", "/tmp/study_reference_lr", "Where the study writes.")
_GRID = flags.DEFINE_list(
    "grid", ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "2e-2"], "Full Data's learning rates."
)
_MODELS = flags.DEFINE_list("models", [], "Candidates to rerun (default: the whole pool).")
_FILL_FROM = flags.DEFINE_string(
    "fill_from",
    None,
    "For a variant rerun of a copy of run BASE (study_variants.py): the run whose entries stand "
    "in for the methods --workdir lacks (Full Data, Cold and Warmup Start).",
)

TUNED, UNTUNED = "full_data", "full_data_lr_fixed"


def _tuned_entries(config, workdir: str, out: str) -> list[dict]:
    """Full Data with the LR grid for every candidate (cached in <out>/full_data_tuned.jsonl)."""
    path = os.path.join(out, "full_data_tuned.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {e["model"]: e for e in map(json.loads, filter(str.strip, f))}
    cands = [c for c in pool.candidates(config) if not _MODELS.value or c.name in _MODELS.value]
    todo = [c for c in cands if c.name not in done]
    if todo:
        store = prepare.prepare(config, workdir)  # restored: the run's stamp matches
        ref = train_reference(config, store, workdir)  # restored from the run's checkpoints
        seeds = pool.seeds(config)
        for cand in todo:
            model = pool.build(cand, config, store.feature_map)
            outs = protocol.run_seeds(
                "full_data", model, store, config, ref.final.params["embed"], None, seeds
            )
            e = methods.seed_results_entry("full_data", cand, seeds, outs)
            e["lr_grid"] = outs[0].info["lr_grid"]
            e["lr_grid_val_auc"] = outs[0].info["lr_grid_val_auc"]
            done[cand.name] = e
            with open(path, "a") as f:
                f.write(json.dumps(e) + "\n")
            logging.info(
                "%s: lr %.0e (val AUC %s), test AUC %.4f +- %.4f",
                cand.name,
                outs[0].info["lr"],
                ", ".join(f"{a:.4f}" for a in e["lr_grid_val_auc"]),
                e["auc"],
                e["auc_std"],
            )
    return [done[c.name] for c in cands]


def _table(fid: dict, ceiling: dict) -> list[str]:
    def ci(v, key):
        lo, hi = v.get(f"{key}_ci", (float("nan"),) * 2)
        return f"{v[key]:.3f} [{lo:.2f}, {hi:.2f}]"

    lines = [
        "| method | Kendall tau [95% CI] | Spearman [95% CI] | mean AUC gap |",
        "|---|---|---|---|",
    ]
    for m, v in sorted(fid.items()):
        lines.append(
            f"| {m} | {ci(v, 'kendall')} | {ci(v, 'spearman')} | {v['mean_auc_gap']:+.4f} |"
        )
    lines.append(
        f"| (noise ceiling: Full Data seed agreement) | {ceiling.get('kendall', float('nan')):.3f} | {ceiling.get('spearman', float('nan')):.3f} | |"
    )
    return lines


def _against_tuned(others: list[dict], tuned: list[dict]) -> list[dict]:
    """The run's entries with the tuned Full Data as full_data, the run's own renamed."""
    return [dict(r, method=UNTUNED) if r["method"] == TUNED else r for r in others] + tuned


def _fidelity_both_ways(others: list[dict], tuned: list[dict], bootstrap: int) -> dict:
    """Every method's rank correlations against the run's Full Data ("before") and against the
    tuned one ("after"; the run's own becomes the method full_data_lr_fixed), with the noise
    ceiling of each reference."""
    after_results = _against_tuned(others, tuned)
    return {
        "before": fidelity.fidelity_table(others, bootstrap=bootstrap),
        "before_ceiling": fidelity.noise_ceiling(others),
        "after": fidelity.fidelity_table(after_results, bootstrap=bootstrap),
        "after_ceiling": fidelity.noise_ceiling(after_results),
    }


def main(argv):
    del argv
    config = _CONFIG.value.copy_and_resolve_references()
    workdir, out = _WORKDIR.value, _OUT.value
    config.progress = False
    config.evaluate.reference_lr_grid = tuple(float(x) for x in _GRID.value)
    os.makedirs(out, exist_ok=True)
    res = results.read_filled(workdir, _FILL_FROM.value)
    tuned = _tuned_entries(config, workdir, out)
    names = {e["model"] for e in tuned}
    others = [r for r in res["results"] if r["model"] in names and r["method"] != "reference"]
    bootstrap = int(config.evaluate.bootstrap)
    test = _fidelity_both_ways(others, tuned, bootstrap)
    # The validation day (the final models' validation AUCs): the day a protocol choice, such as
    # tuning Full Data's rate by default, may be made on; the test day only reports.
    val = _fidelity_both_ways(
        fidelity.on_validation_day({"results": others}, bootstrap=0)["results"],
        fidelity.on_validation_day({"results": tuned}, bootstrap=0)["results"],
        bootstrap,
    )
    chosen = {e["model"]: e["per_seed"][0]["lr"] for e in tuned}
    summary = {
        "grid": list(config.evaluate.reference_lr_grid),
        "chosen_lr": chosen,
        "full_data_tuned": {e["model"]: [e["auc"], e["auc_std"]] for e in tuned},
        **test,
        "validation": val,
    }
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    # The run's results with the tuned Full Data as full_data (the run's own is left out: not a
    # method of results.json), so that experiments/fidelity_check.py --workdir=<out> scores it
    # and pools replicates' studies.
    kept = [r for r in res["results"] if r["method"] == "reference"]
    kept += [r for r in others if r["method"] != TUNED]
    results.save(out, {**res, "results": kept + tuned, "fidelity": {}})
    print("Chosen Full Data rates:", ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()))
    for day, figs in (("test", test), ("validation", val)):
        print(f"\n## {day} day: against Full Data at train.learning_rate (the run's own)\n")
        print("\n".join(_table(figs["before"], figs["before_ceiling"])))
        print(f"\n## {day} day: against Full Data with the LR grid (chosen on validation)\n")
        print("\n".join(_table(figs["after"], figs["after_ceiling"])))


if __name__ == "__main__":
    app.run(main)
