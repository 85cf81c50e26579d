"""report.md in the layout of the paper's Table 3, the fidelity table, and the PNG plots."""

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
    "random": "Random Selection",
    "kmeans": "K-Means Clustering",
    "el2n": "EL2N Selection",
    "diet": "DIET",
}
MODEL_ORDER = BACKBONES


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def table3(results: list[dict]) -> str:
    """Methods x models, AUC and LogLoss; best AUC per model in bold, second underlined."""
    by = {(r["method"], r["model"]): r for r in results}
    models = [m for m in MODEL_ORDER if any(k[1] == m for k in by)]
    models += sorted({k[1] for k in by} - set(models))
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
            auc = _fmt(r["auc"])
            if ranks[m] and r["auc"] == ranks[m][0]:
                auc = f"**{auc}**"
            elif len(ranks[m]) > 1 and r["auc"] == ranks[m][1]:
                auc = f"<u>{auc}</u>"
            cells += [auc, _fmt(r["logloss"])]
        lines.append(f"| {METHOD_LABELS.get(meth, meth)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_markdown(fidelity: dict) -> str:
    lines = [
        "| Method | Spearman | Kendall | cost ratio (full / method) | mean AUC gap to full | models |",
        "|---|---|---|---|---|---|",
    ]
    for meth in [m for m in METHOD_ORDER if m in fidelity]:
        f = fidelity[meth]
        lines.append(
            f"| {METHOD_LABELS.get(meth, meth)} | {_fmt(f['spearman'])} | {_fmt(f['kendall'])} | "
            f"{f['cost_ratio']:.2f}x | {f['mean_auc_gap']:+.4f} | {len(f['models'])} |"
        )
    return "\n".join(lines)


def write_report(workdir: str, res: dict) -> str:
    """Writes report.md (and the Figure 1 plot when full_data results exist); returns its path."""
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
    parts += ["## Test AUC and LogLoss (Table 3 layout)", "", table3(res["results"]), ""]
    if res.get("fidelity"):
        parts += ["## Fidelity to full-data training", "", fidelity_markdown(res["fidelity"]), ""]
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
