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
(`jax.eval_shape`: no weights are made) to count its dense parameters. Prints a markdown table,
candidates in Full Data's order (rank 1 = best AUC), then per method: the pool's AUC spread
(best - worst) against the mean std over seeds of a candidate's AUC (a method that compresses
the pool's differences below its seed noise cannot rank it, whatever it learned), Kendall tau
against Full Data, and Spearman's rho between its AUCs and log(dense parameters): the capacity
a method's AUCs reward where Full Data's do not.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from scipy import stats

from diet_jax import results
from diet_jax.data.store import StageStore
from diet_jax.evaluate import fidelity, pool

_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "A finished run's workdir.")
_DAY = flags.DEFINE_enum("day", "test", ["test", "validation"], "The day the AUCs are from.")
_FILL_FROM = flags.DEFINE_string(
    "fill_from", None, "A base run whose entries stand in for the methods the workdir lacks."
)

ORDER = ("full_data", "warmup_start", "cold_start", "random", "kmeans", "el2n", "diet")


def dense_params(workdir: str) -> dict[str, int]:
    """{candidate: dense parameter count} of the run's pool, built abstractly."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    store_dir = config.data.get("store_dir") or os.path.join(workdir, "data")
    fmap = StageStore(store_dir).feature_map
    out = {}
    for cand in pool.candidates(config):
        model = pool.build(cand, config, fmap)
        shapes, _ = jax.eval_shape(lambda m=model: m.init_dense(jax.random.key(0)))
        out[cand.name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return out


def rank_table(res: dict, params: dict[str, int]) -> str:
    rows = [r for r in res["results"] if r["method"] != "reference"]
    by = {(r["method"], r["model"]): r["auc"] for r in rows}
    std = {(r["method"], r["model"]): r.get("auc_std", float("nan")) for r in rows}
    models = sorted(params)
    methods = [m for m in ORDER if all((m, c) in by for c in models)]
    if "full_data" not in methods:
        raise SystemExit("The run has no Full Data entry for every candidate of its pool.")
    auc = {m: np.array([by[(m, c)] for c in models]) for m in methods}
    rank = {m: len(models) + 1 - stats.rankdata(auc[m]) for m in methods}
    lines = [
        "| candidate | dense params | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for i in np.argsort(rank["full_data"], kind="stable"):
        cells = [f"{rank[m][i]:.0f} ({auc[m][i]:.4f})" for m in methods]
        lines.append(f"| {models[i]} | {params[models[i]]:,} | " + " | ".join(cells) + " |")
    log_p = np.log([params[c] for c in models])
    lines += [
        "",
        "| method | AUC spread over the pool | mean seed std | spread / std "
        "| Kendall tau vs Full Data | Spearman(AUC, log params) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        tau = stats.kendalltau(auc[m], auc["full_data"])[0]
        rho = stats.spearmanr(auc[m], log_p)[0]
        spread = auc[m].max() - auc[m].min()
        sd = float(np.mean([std[(m, c)] for c in models]))
        lines.append(
            f"| {m} | {spread:.4f} | {sd:.4f} | {spread / sd:.1f} | {tau:.2f} | {rho:.2f} |"
        )
    return "\n".join(lines)


def main(_):
    res = results.read_filled(_WORKDIR.value, _FILL_FROM.value)
    if _DAY.value == "validation":
        res = fidelity.on_validation_day(res)
    print(f"{_WORKDIR.value}, {_DAY.value} day (rank (seed-mean AUC); 1 = best)\n")
    print(rank_table(res, dense_params(_WORKDIR.value)))


if __name__ == "__main__":
    app.run(main)
