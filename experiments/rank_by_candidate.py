"""Where a method's ranking of the pool parts from Full Data's: each candidate's rank under
every method, the spread of the pool's AUCs, and how much each method's AUCs follow the
candidates' size (dense parameters).

    python experiments/rank_by_candidate.py --workdir=runs/synthetic
    python experiments/rank_by_candidate.py --workdir=runs/taobao_synth --day=validation
    python experiments/rank_by_candidate.py --workdir=R/variant --fill_from=runs/taobao_synth

Reads `<workdir>/results.json` (seed means per (method, candidate); `--day=validation` the
final models' validation AUCs, as `fidelity_check.py`; `--fill_from=BASE`: a variant rerun
of a copy of BASE takes the entries it lacks from BASE) and `<workdir>/config.json` with the
stage store's feature map, from which every candidate of the pool is built abstractly
(`pool.dense_params`: no weights are made) to count its dense parameters. Prints a markdown
table, candidates in Full Data's order (rank 1 = best AUC), then per method
(`fidelity.candidate_ranks`): the pool's AUC spread (best - worst) against the mean std over
seeds of a candidate's AUC (a method that compresses the pool's differences below its seed noise
cannot rank it, whatever it learned), Kendall tau against Full Data, and Spearman's rho between
its AUCs and log(dense parameters): the capacity a method's AUCs reward where Full Data's do not.
"""

import json
import os

import ml_collections
from absl import app, flags

from diet_jax import results
from diet_jax.data.store import StageStore
from diet_jax.evaluate import fidelity, pool

_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "A finished run's workdir.")
_DAY = flags.DEFINE_enum("day", "test", ["test", "validation"], "The day the AUCs are from.")
_FILL_FROM = flags.DEFINE_string(
    "fill_from", None, "A base run whose entries stand in for the methods the workdir lacks."
)

ORDER = (
    "full_data",
    "warm_full_data",
    "warmup_start",
    "cold_start",
    "random",
    "kmeans",
    "el2n",
    "diet",
)


def markdown(t: dict, params: dict[str, int]) -> str:
    methods = t["methods"]
    lines = [
        "| candidate | dense params | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for i, c in enumerate(t["models"]):
        cells = [f"{t['rank'][m][i]:.0f} ({t['auc'][m][i]:.4f})" for m in methods]
        lines.append(f"| {c} | {params[c]:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | AUC spread over the pool | mean seed std | spread / std "
        "| Kendall tau vs Full Data | Spearman(AUC, log params) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        s = t["summary"][m]
        lines.append(
            f"| {m} | {s['spread']:.4f} | {s['seed_std']:.4f} | {s['spread'] / s['seed_std']:.1f} "
            f"| {s['kendall']:.2f} | {s['size_spearman']:.2f} |"
        )
    return "\n".join(lines)


def main(_):
    res = results.read_filled(_WORKDIR.value, _FILL_FROM.value)
    if _DAY.value == "validation":
        res = fidelity.on_validation_day(res)
    with open(os.path.join(_WORKDIR.value, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    store_dir = config.data.get("store_dir") or os.path.join(_WORKDIR.value, "data")
    params = pool.dense_params(config, StageStore(store_dir).feature_map)
    rows = [r for r in res["results"] if r["method"] != "reference"]
    try:
        table = fidelity.candidate_ranks(rows, params, ORDER)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"{_WORKDIR.value}, {_DAY.value} day (rank (seed-mean AUC); 1 = best)\n")
    print(markdown(table, params))


if __name__ == "__main__":
    app.run(main)
