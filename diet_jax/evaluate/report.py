"""report.md: the paper's Table 3 as a view of the candidate pool, the pool table, fidelity with
bootstrap intervals and both cost ratios, and the PNG plots (AUC vs cost, reduced vs full)."""

from __future__ import annotations

import math
import os

import numpy as np

from diet_jax.io_utils import atomic_write_text
from diet_jax.models import BACKBONES
from diet_jax.results import CANDIDATE_METHODS

METHOD_ORDER = CANDIDATE_METHODS  # Table 3's row order
METHOD_LABELS = {
    "reference": "Reference (teacher)",
    "full_data": "Full Data",
    "cold_start": "Cold Start",
    "warmup_start": "Warmup Start",
    "warm_full_data": "Warm Full Data (teacher's table)",
    "random": "Random Selection",
    "kmeans": "K-Means Clustering",
    "el2n": "EL2N Selection",
    "diet": "DIET",
}
MODEL_ORDER = BACKBONES


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _is_base(r: dict) -> bool:
    """A zoo backbone's base setting, or a user's own model (diet_jax.candidate)."""
    return r["method"] != "reference" and r.get("backbone", r["model"]) == r["model"]


def _auc_cell(r: dict) -> str:
    """AUC, with its seed std when the entry has more than one seed."""
    if len(r.get("seeds", [])) > 1:
        return f"{_fmt(r['auc'])} ± {r['auc_std']:.4f}"
    return _fmt(r["auc"])


def table3(results: list[dict]) -> str:
    """Methods x base candidates (the paper's Table 3 view of the pool), AUC (mean ± std over
    seeds) and LogLoss; best mean AUC per model in bold, second underlined."""
    by = {(r["method"], r["model"]): r for r in results if _is_base(r)}
    present = list(dict.fromkeys(k[1] for k in by))
    models = [m for m in MODEL_ORDER if m in present] + [m for m in present if m not in MODEL_ORDER]
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in by)]
    head = "| Method | " + " | ".join(f"{m} AUC | {m} LogLoss" for m in models) + " |"
    sep = "|---|" + "---|---|" * len(models)
    ranks = {}
    for m in models:
        aucs = sorted({by[(meth, m)]["auc"] for meth in methods if (meth, m) in by}, reverse=True)
        ranks[m] = aucs
    lines = [head, sep]
    for meth in methods:
        cells = []
        for m in models:
            r = by.get((meth, m))
            if r is None:
                cells += ["", ""]
                continue
            auc = _auc_cell(r)
            if ranks[m] and r["auc"] == ranks[m][0]:
                auc = f"**{auc}**"
            elif len(ranks[m]) > 1 and r["auc"] == ranks[m][1]:
                auc = f"<u>{auc}</u>"
            cells += [auc, _fmt(r["logloss"])]
        lines.append(f"| {METHOD_LABELS.get(meth, meth)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pool_table(results: list[dict]) -> str:
    """Candidates x methods, test AUC mean ± std over seeds, with the pool mean last."""
    cands = [r for r in results if r["method"] == "full_data"] or [
        r for r in results if r["method"] != "reference"
    ]
    others = [r for r in results if r["method"] != "reference"]  # e.g. a user's own model
    names = list(dict.fromkeys(r["model"] for r in cands + others))
    by = {(r["method"], r["model"]): r for r in results if r["method"] != "reference"}
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in by)]
    lines = [
        "| candidate | backbone | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name in names:
        backbone = next((r.get("backbone", name) for k, r in by.items() if k[1] == name), name)
        cells = [_auc_cell(by[(m, name)]) if (m, name) in by else "" for m in methods]
        lines.append(f"| {name} | {backbone} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        v = [by[(m, n)]["auc"] for n in names if (m, n) in by]
        means.append(f"{np.mean(v):.4f} ({len(v)})" if v else "")
    lines.append("| **pool mean** (candidates) | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def _ci(f: dict, key: str) -> str:
    ci = f.get(f"{key}_ci")
    if not ci or any(c is None or math.isnan(c) for c in ci):
        return _fmt(f[key])
    return f"{_fmt(f[key])} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _ratio(x) -> str:
    return "n/a" if x is None or math.isnan(x) or math.isinf(x) else f"{x:.2f}x"


def _snr(f: dict) -> str:
    """The method's candidates' true spread over its seed means' noise (`fidelity.
    spread_and_noise`), with the two stds; "n/a" with one seed."""
    if "snr" not in f:
        return "n/a"
    return f"{f['snr']:.1f} ({f['true_spread_std']:.4f} / {f['seed_noise_std']:.4f})"


def fidelity_markdown(fidelity: dict) -> str:
    lines = [
        "| Method | Spearman [95% CI] | Kendall tau [95% CI] | cost ratio, historical phase "
        "(full / method) | per epoch | cost ratio, end to end | mean AUC gap to full | "
        "seed agreement (tau) | one seed's tau | SNR of its seed means | candidates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for meth in [m for m in METHOD_ORDER if m in fidelity]:
        f = fidelity[meth]
        lines.append(
            f"| {METHOD_LABELS.get(meth, meth)} | {_ci(f, 'spearman')} | {_ci(f, 'kendall')} | "
            f"{_ratio(f.get('cost_ratio_historical', float('nan')))} | "
            f"{_ratio(f.get('cost_ratio_historical_per_epoch', float('nan')))} | "
            f"{_ratio(f.get('cost_ratio_end_to_end', f['cost_ratio']))} | "
            f"{f['mean_auc_gap']:+.4f} | {_fmt(f.get('seed_kendall', float('nan')))} | "
            f"{_fmt(f.get('single_seed_kendall', float('nan')))} | "
            f"{_snr(f)} | {len(f['models'])} |"
        )
    return "\n".join(lines)


def ceiling_markdown(ceiling: dict) -> list[str]:
    """The noise ceiling's sentence (and a blank line), or nothing without one."""
    if not ceiling:
        return []
    per_seed = ", ".join(f"{t:.2f}" for t in ceiling["kendall_leave_one_seed_out"])
    return [
        f"Noise ceiling: one Full Data seed against the mean of the other seeds ranks the pool "
        f"with Kendall tau {ceiling['kendall']:.2f} (per seed {per_seed}; Spearman "
        f"{ceiling['spearman']:.2f}): a method's tau near this figure is as good as another "
        "Full Data seed. Seed agreement (table): the same for each method against itself, i.e. "
        "how much of its ranking is seed noise."
        + _faithful_sentence(ceiling.get("faithful_kendall") or {}),
        "",
    ]


def _faithful_sentence(faithful: dict) -> str:
    if not faithful:
        return ""
    lo, hi = faithful["interval"]
    return (
        f" A faithful method (Full Data's true means and seed noise, {faithful['seeds']} seeds "
        f"against {faithful['seeds']}: `fidelity.faithful_tau`) would reach tau "
        f"{faithful['mean']:.2f} [{lo:.2f}, {hi:.2f}] against Full Data's seed means; a "
        "method's tau is read against this."
    )


COST_NOTE = (
    "Cost ratios compare training time only, measured alike for every method: each jitted "
    "function is compiled and run once before its timed calls (the runs' `timed_compiles` "
    "count compilations inside timed regions and stay 0), validation passes are outside the "
    "clock, and distillation and selection are reported apart under Timings. The historical "
    "phase is Full Data's epochs over the historical stages against a reduced method's epochs "
    "on its rows (Cold and Warmup Start have none: n/a), over the whole training (Full Data one "
    "epoch, a reduced method evaluate.max_epochs) and per epoch (the paper's Table 5 "
    "Time/ep); end to end adds the fine-tune on the "
    "subsequent block. A reduced method's rows time is one member's share of its group "
    "(the learning-rate grid or the seeds; `evaluate.group_mode`)."
)


def write_report(workdir: str, res: dict) -> str:
    """Writes report.md (and the figures when full_data results exist); returns its path."""
    parts = [
        f"# DIET report: {res['dataset']}",
        "",
        f"Compression ratio {res['ratio']:.4g}; devices {res['devices']}; stages "
        + ", ".join(f"{s['name']} ({s['role']}, {s['rows']:,} rows)" for s in res["stages"])
        + ".",
        "",
    ]
    if "oracle" in res and "test" in res["oracle"]:
        parts += [
            f"Best achievable test AUC (true probabilities): {res['oracle']['test']['auc']:.4f}.",
            "",
        ]
    ref = [r for r in res["results"] if r["method"] == "reference"]
    if ref:
        parts += [
            f"Reference model ({ref[0]['model']}) test AUC {ref[0]['auc']:.4f}, LogLoss {ref[0]['logloss']:.4f}.",
            "",
        ]
    seeds = sorted({len(r.get("seeds", [0])) for r in res["results"] if r["method"] != "reference"})
    parts += [
        "## Test AUC and LogLoss (Table 3 layout: the base setting of each backbone)",
        "",
        f"AUC is the mean ± sample std over {'/'.join(map(str, seeds))} seed(s).",
        "",
        table3(res["results"]),
        "",
    ]
    if any(not _is_base(r) for r in res["results"] if r["method"] != "reference"):
        parts += ["## Test AUC over the candidate pool", "", pool_table(res["results"]), ""]
    if res.get("fidelity"):
        parts += [
            "## Fidelity to full-data training over the pool",
            "",
            "Rank correlations of the candidates' seed-mean test AUCs with Full Data's; the "
            "intervals resample candidates and seeds (percentile bootstrap).",
            "",
            fidelity_markdown(res["fidelity"]),
            "",
            *ceiling_markdown(res.get("fidelity_ceiling", {})),
            COST_NOTE,
            "",
        ]
    cost = plot_auc_vs_cost(res["results"], os.path.join(workdir, "figure1.png"))
    if cost:
        parts += [
            "## Test AUC against training cost",
            "",
            f"![AUC vs training cost]({os.path.basename(cost)})",
            "",
        ]
    plot = plot_reduced_vs_full(
        res["results"], os.path.join(workdir, "figure1_reduced_vs_full.png")
    )
    if plot:
        parts += [f"![reduced vs full]({os.path.basename(plot)})", ""]
    if res.get("timings"):
        parts += ["## Timings (seconds)", "", "| what | value |", "|---|---|"]
        # Scalars only; per-stage details stay in results.json.
        parts += [
            f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in res["timings"].items()
            if isinstance(v, int | float)
        ]
        parts.append("")
    path = os.path.join(workdir, "report.md")
    atomic_write_text(path, "\n".join(parts))
    return path


def _save_figure(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def cost_points(results: list[dict]) -> dict:
    """{method: {"auc", "auc_err", "seconds", "seconds_err", "candidates"}} over the pool.

    "auc": the pool-mean test AUC (mean over seeds); "auc_err": the std over seeds of the pool
    mean of each seed; "seconds": mean end-to-end training seconds per candidate and seed, with
    its std over seeds likewise. Only candidates that Full Data also ran, when it ran any.
    """
    rows = [r for r in results if r["method"] not in ("reference",)]
    ref = {r["model"] for r in rows if r["method"] == "full_data"}
    out = {}
    for meth in METHOD_ORDER:
        mine = [r for r in rows if r["method"] == meth and (not ref or r["model"] in ref)]
        if not mine:
            continue
        per = [r.get("per_seed") or [r] for r in mine]
        n_seeds = min(len(p) for p in per)
        auc_s = [np.mean([p[i]["auc"] for p in per]) for i in range(n_seeds)]
        sec_s = [np.mean([p[i]["train_seconds"] for p in per]) for i in range(n_seeds)]
        out[meth] = {
            "auc": float(np.mean([r["auc"] for r in mine])),
            "auc_err": float(np.std(auc_s, ddof=1)) if n_seeds > 1 else 0.0,
            "seconds": float(np.mean([r["train_seconds"] for r in mine])),
            "seconds_err": float(np.std(sec_s, ddof=1)) if n_seeds > 1 else 0.0,
            "candidates": len(mine),
        }
    return out


def plot_auc_vs_cost(results: list[dict], path: str) -> str | None:
    """Figure 1 of the issue: pool-mean test AUC against training seconds per candidate, one
    point per method with error bars over seeds, and each candidate as a small dot."""
    points = cost_points(results)
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (meth, p) in enumerate(points.items()):
        color = f"C{i}"
        dots = [r for r in results if r["method"] == meth]
        ax.scatter(
            [max(r["train_seconds"], 1e-4) for r in dots],
            [r["auc"] for r in dots],
            s=8,
            color=color,
            alpha=0.35,
        )
        ax.errorbar(
            max(p["seconds"], 1e-4),
            p["auc"],
            xerr=p["seconds_err"],
            yerr=p["auc_err"],
            fmt="o",
            ms=7,
            capsize=3,
            color=color,
            label=f"{METHOD_LABELS.get(meth, meth)} ({p['candidates']})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training seconds per candidate and seed (end to end, compile excluded)")
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_title("Test AUC against training cost over the candidate pool")
    ax.legend(fontsize=7, loc="best")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_reduced_vs_full(results: list[dict], path: str) -> str | None:
    """The paper's Figure 1: each point a (method, model), full-data AUC on x, reduced on y."""
    by = {(r["method"], r["model"]): r["auc"] for r in results}
    methods = [m for m in METHOD_ORDER if m != "full_data" and any(k[0] == m for k in by)]
    pairs = {
        m: [
            (by[("full_data", mo)], by[(m, mo)])
            for (meth, mo) in by
            if meth == m and ("full_data", mo) in by
        ]
        for m in methods
    }
    if not any(pairs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    allv = [v for ps in pairs.values() for p in ps for v in p]
    lo, hi = min(allv) - 0.005, max(allv) + 0.005
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    for m, ps in pairs.items():
        if ps:
            a = np.asarray(ps)
            ax.scatter(a[:, 0], a[:, 1], label=METHOD_LABELS.get(m, m), s=30)
    ax.set_xlabel("test AUC, full data")
    ax.set_ylabel("test AUC, reduced data")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(fontsize=8)
    ax.set_title("Reduced-data vs full-data AUC")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_auc_vs_ratio(points: list[dict], full_auc: float | None, path: str, title: str) -> str:
    """The paper's Figure 3: test AUC against compression ratio, one line per series.

    points: [{"series": str, "ratio": float, "auc": float}, ...]
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for series in sorted({p["series"] for p in points}):
        ps = sorted((p["ratio"], p["auc"]) for p in points if p["series"] == series)
        ax.plot([r for r, _ in ps], [a for _, a in ps], marker="o", label=series)
    if full_auc is not None:
        ax.axhline(full_auc, ls=":", color="k", label="full data")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)
    return path
