"""The issue-12 scorecard of a finished run: does DIET beat selection and rank the pool like full data?

    python experiments/fidelity_check.py --workdir=runs/synthetic
    python experiments/fidelity_check.py --workdir=runs/ml100k --json_out=/tmp/ml.json

Reads `<workdir>/results.json` only (the foundation issue's contract) and prints, as markdown:
DIET - Random per base backbone (seed mean and std, and the difference's standard error), the
pool-mean test AUC of every method (with the std over seeds of the pool mean), Kendall tau and
Spearman against Full Data with their bootstrap intervals, both historical cost ratios, and each
criterion of the issue as PASS / FAIL with the figure it was decided on. Nothing is recomputed
but the pool means, so the figures are the run's own.

`--day=validation`: the same scorecard on the validation day, from every run's final-model
validation AUC (`per_seed[i]["val_auc"]`; fidelity recomputed from them): the day on which a
protocol or distillation setting may be chosen. The test day only reports.

`--replicates=W2[,W3...]`: pools the seeds of replicate runs of the same config with other
`config.seed` values (each its own teacher, distillation and candidate seeds) with the
workdir's (`results.merge_replicates`), so that every entry has 6 or 9 seeds and the noise
ceiling rises. `--replicate_fill_from=B2[,B3...]` (one per replicate, '' for none) is `--fill_from`
for each replicate: a variant rerun of replicate W2 takes the entries it lacks from B2.

`--fill_from=BASE`: for a variant rerun of a copy of run BASE that recomputed some methods only
(experiments/study_variants.py, table4.py --base): every (method, candidate) entry the workdir
lacks is BASE's, and the fidelity is recomputed.
"""

import math

from absl import app, flags

from diet_jax import results
from diet_jax.evaluate import fidelity, report
from diet_jax.io_utils import atomic_write_json

_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "A finished run's workdir.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the scorecard as JSON here.")
_DAY = flags.DEFINE_enum("day", "test", ["test", "validation"], "The day the AUCs are from.")
_REPLICATES = flags.DEFINE_list("replicates", [], "Replicate runs whose seeds are pooled.")
_FILL_FROM = flags.DEFINE_string(
    "fill_from", None, "A base run whose entries stand in for the methods the workdir lacks."
)
_REPLICATE_FILL_FROM = flags.DEFINE_list(
    "replicate_fill_from", [], "--fill_from for each replicate, in order ('' = none)."
)

SELECTIONS = ("random", "el2n", "kmeans")


SPREAD_KEYS = ("true_spread_std", "seed_noise_std", "snr")


def scorecard(res: dict) -> dict:
    rows = [r for r in res["results"] if r["method"] != "reference"]
    by = {(r["method"], r["model"]): r for r in rows}
    bases = [m for m in report.MODEL_ORDER if ("diet", m) in by and ("random", m) in by]
    per_backbone = {}
    for m in bases:
        d, r = by[("diet", m)], by[("random", m)]
        n = max(len(d.get("seeds", [0])), 1)
        se = math.sqrt((d.get("auc_std", 0.0) ** 2 + r.get("auc_std", 0.0) ** 2) / n)
        per_backbone[m] = {
            "diet": d["auc"],
            "diet_std": d.get("auc_std", 0.0),
            "random": r["auc"],
            "random_std": r.get("auc_std", 0.0),
            "diff": d["auc"] - r["auc"],
            "diff_se": se,
        }
    points = report.cost_points(res["results"])
    fid = res.get("fidelity", {})
    ceiling = fidelity.noise_ceiling(res["results"])
    table = fidelity.fidelity_table(res["results"], bootstrap=0)
    wins = sum(v["diff"] > 0 for v in per_backbone.values())
    pool = {m: p["auc"] for m, p in points.items()}
    diet_tau = fid.get("diet", {}).get("kendall", float("nan"))
    random_tau = fid.get("random", {}).get("kendall", float("nan"))
    ratio_h = fid.get("diet", {}).get("cost_ratio_historical", float("nan"))
    ratio_ep = fid.get("diet", {}).get("cost_ratio_historical_per_epoch", float("nan"))
    criteria = {
        "diet_above_random_on_4_of_5_backbones": (wins >= 4, f"{wins} of {len(per_backbone)}"),
        "diet_above_every_selection_on_pool_mean": (
            # Not passed vacuously: DIET and at least one selection must have run.
            "diet" in pool
            and any(s in pool for s in SELECTIONS)
            and all(pool["diet"] > pool[s] for s in SELECTIONS if s in pool),
            ", ".join(f"{m} {pool[m]:.4f}" for m in ("diet", *SELECTIONS) if m in pool),
        ),
        "diet_kendall_at_least_0.8": (diet_tau >= 0.8, f"{diet_tau:.3f}"),
        "diet_kendall_above_random": (diet_tau > random_tau, f"{diet_tau:.3f} vs {random_tau:.3f}"),
        "historical_50x_cheaper_whole_training": (ratio_h >= 50, f"{ratio_h:.1f}x"),
        "historical_50x_cheaper_per_epoch": (ratio_ep >= 50, f"{ratio_ep:.1f}x"),
    }
    return {
        "candidates": len({r["model"] for r in rows}),
        "seeds": sorted({len(r.get("seeds", [0])) for r in rows}),
        "per_backbone": per_backbone,
        "pool": points,
        "fidelity": {
            m: {
                k: f[k]
                for k in (
                    "kendall",
                    "kendall_ci",
                    "spearman",
                    "spearman_ci",
                    "cost_ratio_historical",
                    "cost_ratio_historical_per_epoch",
                    "cost_ratio_end_to_end",
                )
                if k in f
            }
            for m, f in fid.items()
        },
        "criteria": {k: {"pass": bool(v[0]), "value": v[1]} for k, v in criteria.items()},
        # Recomputed from the entries, so that a results.json of an older release has them too.
        "ceiling": ceiling,
        # Recomputed too (bootstrap off: instant), for results.json files from before the key.
        "single_seed_kendall": {
            m: f.get("single_seed_kendall", float("nan")) for m, f in table.items()
        },
        "spread_and_noise": {
            m: {k: f[k] for k in SPREAD_KEYS}
            for m, f in [("full_data", ceiling.get("faithful_kendall", {})), *table.items()]
            if all(k in f for k in SPREAD_KEYS)
        },
        "seed_kendall": {
            m: fidelity.seed_agreement(res["results"], m).get("kendall", float("nan"))
            for m in points
        },
    }


def _ci(f: dict, key: str) -> str:
    ci = f.get(f"{key}_ci")
    value = f.get(key, float("nan"))
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(card: dict) -> str:
    out = [
        f"{card['candidates']} candidates, seeds per entry {card['seeds']}",
        "",
        "| backbone | DIET | Random | DIET - Random (± s.e.) |",
        "|---|---|---|---|",
    ]
    for m, v in card["per_backbone"].items():
        out.append(
            f"| {m} | {v['diet']:.4f} ± {v['diet_std']:.4f} | {v['random']:.4f} ± "
            f"{v['random_std']:.4f} | {v['diff']:+.4f} ± {v['diff_se']:.4f} |"
        )
    out += [
        "",
        "| method | pool-mean AUC (± std over seeds) | Kendall tau [95% CI] | "
        "Spearman [95% CI] | historical ratio (whole / per epoch) | end to end | "
        "seed agreement | one seed's tau |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, p in card["pool"].items():
        f = card["fidelity"].get(m, {})
        ratios = (
            f"{_x(f.get('cost_ratio_historical'))} / {_x(f.get('cost_ratio_historical_per_epoch'))}"
            if f
            else "-"
        )
        agree = f"{card['seed_kendall'].get(m, float('nan')):.2f}"
        one = card["single_seed_kendall"].get(m)
        one = "-" if one is None or math.isnan(one) else f"{one:.2f}"
        out.append(
            f"| {m} | {p['auc']:.4f} ± {p['auc_err']:.4f} | "
            f"{_ci(f, 'kendall') if f else '-'} | {_ci(f, 'spearman') if f else '-'} | "
            f"{ratios} | {_x(f.get('cost_ratio_end_to_end'))} | {agree} | {one} |"
            if f
            else f"| {m} | {p['auc']:.4f} ± {p['auc_err']:.4f} | - | - | - | - | {agree} | - |"
        )
    out += ["", "| criterion | result | figure |", "|---|---|---|"]
    for k, v in card["criteria"].items():
        out.append(f"| {k} | {'PASS' if v['pass'] else 'FAIL'} | {v['value']} |")
    if card["ceiling"]:
        out += ["", *report.ceiling_markdown(card["ceiling"])[:1]]
    warm, diet = card["fidelity"].get("warm_full_data"), card["fidelity"].get("diet")
    if warm and diet:
        out += [
            "",
            f"Shared-table reference: Full Data from the teacher's table (warm_full_data) ranks "
            f"the pool with Kendall tau {_ci(warm, 'kendall')}, DIET {_ci(diet, 'kendall')}. "
            "Every reduced method's candidates inherit that table: what all of the history "
            'gives from it is a reference for their tau (docs/evaluation.md, "What the shared '
            'table costs the ranking").',
        ]
    if card.get("spread_and_noise"):
        # How much of each method's ranking is its candidates and how much its seeds
        # (`fidelity.spread_and_noise`): a low SNR caps its tau whatever its bias.
        out += [
            "",
            "| method | candidates' true spread (std) | seed noise (std) | SNR of a seed mean |",
            "|---|---|---|---|",
        ]
        for m, v in card["spread_and_noise"].items():
            out.append(
                f"| {m} | {v['true_spread_std']:.4f} | {v['seed_noise_std']:.4f} | {v['snr']:.1f} |"
            )
    if card.get("phases"):
        out += [
            "",
            "| method (validation AUC, pool mean) | best rows epoch | after the fine-tune | "
            "the fine-tune's change | tau vs Full Data: rows / final |",
            "|---|---|---|---|---|",
        ]
        for m, v in card["phases"].items():
            taus = f"{v['rows_kendall']:.2f} / {v['final_kendall']:.2f}"
            out.append(
                f"| {m} | {v['rows']:.4f} | {v['final']:.4f} | {v['finetune']:+.4f} | {taus} |"
            )
    return "\n".join(out)


def _x(ratio) -> str:
    """A cost ratio as "12.3x"; "-" where there is none (no historical phase: NaN)."""
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.1f}x"


def main(_):
    res = results.read_filled(_WORKDIR.value, _FILL_FROM.value)
    runs = [res]
    if _REPLICATES.value:
        fills = _REPLICATE_FILL_FROM.value or [""] * len(_REPLICATES.value)
        if len(fills) != len(_REPLICATES.value):
            raise SystemExit(
                f"--replicate_fill_from has {len(fills)} entries for "
                f"{len(_REPLICATES.value)} replicates."
            )
        runs += [results.read_filled(w, b) for w, b in zip(_REPLICATES.value, fills, strict=True)]
        res = results.merge_replicates(runs)
    if _DAY.value == "validation":
        res = fidelity.on_validation_day(res)  # recomputes the fidelity from the validation AUCs
    elif _FILL_FROM.value or _REPLICATES.value:
        rows = [r for r in res["results"] if r["method"] != "reference"]
        res["fidelity"] = fidelity.fidelity_table(rows, bootstrap=1000)
    card = scorecard(res)
    card["day"] = _DAY.value
    # The rows phase against the fine-tune, from every run's candidate_info (validation day).
    card["phases"] = fidelity.phase_split([run.get("candidate_info", {}) for run in runs])
    print(markdown(card))
    if _JSON_OUT.value:
        atomic_write_json(_JSON_OUT.value, card)


if __name__ == "__main__":
    app.run(main)
