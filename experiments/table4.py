"""Table 4: ablation of memory fusion (MF), target selection (TS), memory selection (MS) and of
phase 2 itself (P2, `distill.refine`: TS and MS are phase 2's, so without it they are moot, "-").

    nice -n 10 python experiments/table4.py --config=configs/synthetic.py --root=/tmp/study/h \
        --models=dcn,finalnet,wukong --seeds=0,1 [--finetune]

Each variant distills again from the shared data and teacher (experiments/study_harness.py)
and trains every candidate model on its memory, for every seed (distillation RNG, real batch
order, candidate init); scored on the VALIDATION day, with Random Selection alongside. A
switched-off component falls back to its plain variant: no fusion (memory from the last stage
only), random hard targets, random active memory (same sizes, same cost), no phase 2 (phase 1's
rows as they are). The paper's rows run with phase 2 on, whatever the config says; the full
method (all four on) is the reference of the paired differences.
Reported: mean and std over seeds per model, and the paired difference to the full method
(same seed), averaged over models.

On the instrument of issue 12 (the whole candidate pool, every seed, the real protocol: the
learning-rate grid, best epoch, fine-tune), through the real pipeline:

    python experiments/table4.py --base=<finished default run> --root=/tmp/table4

runs each variant as a DIET-only rerun of a copy of the base run
(experiments/study_variants.py; the base run is the reference row, its components read from
its config.json) and prints, on the validation day, DIET's pool-mean AUC (std over seeds), its
paired difference to the base (seed by seed), its Kendall tau against Full Data with the
bootstrap interval, its seed agreement and the base backbones on which it beats Random.
`--pool_variants` picks the rows: MF, TS, MS, P2 as 0/1 digits ("0110": no fusion, no phase
2); three digits mean phase 2 on ("011" = "0111"). A row equal to the base is refused.
"""

import json
import os
import subprocess
import sys

import numpy as np
import study_harness as H
from absl import app, flags, logging
from ml_collections import config_flags

from diet_jax.evaluate import fidelity
from diet_jax.io_utils import atomic_write_text

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_ROOT = flags.DEFINE_string("root", "runs/table4", "Harness root (shared teacher, caches).")
_LR = flags.DEFINE_float("lr", 0.0, "Candidates' learning rate on the rows (0: config).")
_MODELS = flags.DEFINE_string("models", "dcn,finalnet,wukong", "Candidate models.")
_SEEDS = flags.DEFINE_string("seeds", "0,1", "Seeds.")
_FINETUNE = flags.DEFINE_bool("finetune", True, "Score after the subsequent-block fine-tune.")
_BASE = flags.DEFINE_string(
    "base", "", "A finished default run: the ablation over its whole pool (see the docstring)."
)
_POOL_VARIANTS = flags.DEFINE_list(
    "pool_variants",
    ["0110", "1111", "1101"],
    "With --base: the (MF, TS, MS, P2) rows to run (three digits: P2 on).",
)

# The rows of the paper's Table 4, in its order, then phase 2 off: (MF, TS, MS, P2).
VARIANTS = (
    (False, True, True, True),
    (True, False, True, True),
    (True, True, False, True),
    (False, False, False, True),
    (True, True, True, False),
    (True, True, True, True),
)
FULL = (True, True, True, True)


def _variant_name(mf: bool, ts: bool, ms: bool, p2: bool = True) -> str:
    if not p2:  # target and memory selection are phase 2's: moot without it
        return f"t4_mf{int(mf)}_p2off"
    return f"t4_mf{int(mf)}_ts{int(ts)}_ms{int(ms)}"


def _overrides(mf: bool, ts: bool, ms: bool, p2: bool) -> dict:
    return {
        "distill.memory_fusion": mf,
        "distill.target_selection": ts,
        "distill.memory_selection": ms,
        "distill.refine": p2,
    }


def parse_code(code: str) -> tuple:
    """ "MF TS MS [P2]" as 0/1 digits -> (mf, ts, ms, p2); without P2, phase 2 is on."""
    if len(code) not in (3, 4) or set(code) - {"0", "1"}:
        raise ValueError(f"--pool_variants: {code!r} is not three or four 0/1 digits.")
    mf, ts, ms, p2 = (tuple(c == "1" for c in code) + (True,))[:4]
    if not p2:  # TS and MS do nothing without phase 2: one row per fusion setting
        ts = ms = True
    return mf, ts, ms, p2


def base_components(base: str) -> tuple:
    """(MF, TS, MS, P2) of a finished run, from its config.json (a run from before
    `distill.refine` refined)."""
    with open(os.path.join(base, "config.json")) as f:
        d = json.load(f)["distill"]
    p2 = bool(d.get("refine", True))
    ts, ms = (d["target_selection"], d["memory_selection"]) if p2 else (True, True)
    return bool(d["memory_fusion"]), bool(ts), bool(ms), p2


def _marks(mf: bool, ts: bool, ms: bool, p2: bool) -> str:
    mark = {True: "✓", False: "✗"}
    sel = (mark[ts], mark[ms]) if p2 else ("-", "-")
    return f"{mark[mf]} | {sel[0]} | {sel[1]} | {mark[p2]}"


def on_pool(base: str, root: str, config_file: str) -> str:
    """Table 4 over the base run's whole pool on the validation day (markdown)."""
    ref = base_components(base)
    rows = []
    for code in _POOL_VARIANTS.value:
        row = parse_code(code)
        if row == ref:
            raise ValueError(f"--pool_variants: {code!r} is the base run itself ({base}).")
        rows.append(row)
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        sys.executable,
        os.path.join(here, "study_variants.py"),
        f"--base={base}",
        f"--root={root}",
        f"--config={config_file}",
        "--models=all",
        "--methods=diet",
    ]
    for row in rows:
        sets = ";".join(f"{k}={v}" for k, v in _overrides(*row).items())
        cmd.append(f"--variant={_variant_name(*row)}:{sets}")
    subprocess.run(cmd, check=True)
    with open(os.path.join(root, "ranking.json")) as f:
        ranks = json.load(f)
    full = np.asarray(ranks["base"]["diet_pool_auc_per_seed"])
    lines = [
        "| MF | TS | MS | P2 | DIET pool-mean AUC (± std over seeds) | paired diff to the base "
        "(± std over seeds) | Kendall tau vs Full Data [95% CI] | seed agreement | "
        "DIET > Random on bases |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, name in [(ref, "base")] + [(r, _variant_name(*r)) for r in rows]:
        r = ranks[name]
        per_seed = np.asarray(r["diet_pool_auc_per_seed"])
        auc, auc_std = fidelity.seed_stats(per_seed)
        diff, diff_std = fidelity.seed_stats(per_seed - full)
        ci = r["diet_kendall_ci"]
        ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        lines.append(
            f"| {_marks(*row)} | {auc:.4f} ± {auc_std:.4f} | "
            f"{diff:+.4f} ± {diff_std:.4f} | {r['diet_kendall']:.3f}{ci} | "
            f"{r['diet_seed_kendall']:.2f} | {r['diet_wins']} of {r['bases']} |"
        )
    rand = ranks["base"]
    lines.append(
        f"| Random | | | | {rand['random_pool_auc']:.4f} | | {rand['random_kendall']:.3f} | | |"
    )
    return (
        f"## Table 4 on the pool (validation day, after the fine-tune; base run {base})\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main(_):
    logging.set_verbosity(logging.WARNING)
    if _BASE.value:
        text = on_pool(
            _BASE.value, _ROOT.value, config_flags.get_config_filename(flags.FLAGS["config"])
        )
        atomic_write_text(os.path.join(_ROOT.value, "table4_pool.md"), text)
        print(text)
        return
    sh = H.setup(_CONFIG.value, _ROOT.value, _LR.value)
    models, seeds = _MODELS.value.split(","), [int(s) for s in _SEEDS.value.split(",")]
    key = "val_auc_ft" if _FINETUNE.value else "val_auc_rows"
    scores = {}  # variant -> {(model, seed): auc}
    for variant in VARIANTS[::-1]:  # the full method first: its rows pair with the others
        rows = H.run_variant(
            sh,
            _variant_name(*variant),
            _overrides(*variant),
            models,
            seeds,
            finetune=_FINETUNE.value,
        )
        scores[variant] = {(r["model"], r["seed"]): r[key] for r in rows if r["method"] == "diet"}
        scores["random"] = {
            (r["model"], r["seed"]): r[key] for r in rows if r["method"] == "random"
        }
    full = scores[FULL]
    head = " | ".join(models)
    lines = [
        f"| MF | TS | MS | P2 | {head} | mean | paired diff to full (mean ± std over seeds) |",
        "|---" * (5 + len(models) + 1) + "|",
    ]

    def row(label, s):
        cells = []
        for mo in models:
            v = [s[(mo, sd)] for sd in seeds]
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f}")
        per_seed = [np.mean([s[(mo, sd)] for mo in models]) for sd in seeds]
        diff = [np.mean([s[(mo, sd)] - full[(mo, sd)] for mo in models]) for sd in seeds]
        return (
            f"| {label} | {' | '.join(cells)} | {np.mean(per_seed):.4f} | "
            f"{np.mean(diff):+.4f} ± {np.std(diff):.4f} |"
        )

    for variant in VARIANTS:
        lines.append(row(_marks(*variant), scores[variant]))
    lines.append(row("Random | | | ", scores["random"]))
    text = (
        f"## Table 4 (validation AUC, {'after the fine-tune' if _FINETUNE.value else 'rows only'}"
        f"; seeds {seeds}; load {os.getloadavg()[0]:.1f}, shared CPU)\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write_text(
        os.path.join(sh.root, "table4_ft.md" if _FINETUNE.value else "table4.md"), text
    )
    print(text)


if __name__ == "__main__":
    app.run(main)
