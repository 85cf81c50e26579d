"""Table 4: ablation of memory fusion (MF), target selection (TS) and memory selection (MS).

    nice -n 10 python experiments/table4.py --config=configs/synthetic.py --root=/tmp/study/h \
        --models=dcn,finalnet,wukong --seeds=0,1 [--finetune]

Each variant distills again from the shared data and teacher (experiments/study_harness.py)
and trains every candidate model on its memory, for every seed (distillation RNG, real batch
order, candidate init); scored on the VALIDATION day, with Random Selection alongside. A
switched-off component falls back to its plain variant: no fusion (memory from the last stage
only), random hard targets, random active memory (same sizes, same cost). Reported: mean and
std over seeds per model, and the paired difference to the full method (same seed), averaged
over models.
"""

import os

import numpy as np
import study_harness as H
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_ROOT = flags.DEFINE_string("root", "runs/table4", "Harness root (shared teacher, caches).")
_LR = flags.DEFINE_float("lr", 0.0, "Candidates' learning rate on the rows (0: config).")
_MODELS = flags.DEFINE_string("models", "dcn,finalnet,wukong", "Candidate models.")
_SEEDS = flags.DEFINE_string("seeds", "0,1", "Seeds.")
_FINETUNE = flags.DEFINE_bool("finetune", True, "Score after the subsequent-block fine-tune.")

# The rows of the paper's Table 4, in its order: (MF, TS, MS).
VARIANTS = (
    (False, True, True),
    (True, False, True),
    (True, True, False),
    (False, False, False),
    (True, True, True),
)


def main(_):
    logging.set_verbosity(logging.WARNING)
    sh = H.setup(_CONFIG.value, _ROOT.value, _LR.value)
    models, seeds = _MODELS.value.split(","), [int(s) for s in _SEEDS.value.split(",")]
    key = "val_auc_ft" if _FINETUNE.value else "val_auc_rows"
    scores = {}  # variant -> {(model, seed): auc}
    for mf, ts, ms in VARIANTS[::-1]:  # the full method first: its rows pair with the others
        name = f"t4_mf{int(mf)}_ts{int(ts)}_ms{int(ms)}"
        overrides = {
            "distill.memory_fusion": mf,
            "distill.target_selection": ts,
            "distill.memory_selection": ms,
        }
        rows = H.run_variant(sh, name, overrides, models, seeds, finetune=_FINETUNE.value)
        scores[(mf, ts, ms)] = {
            (r["model"], r["seed"]): r[key] for r in rows if r["method"] == "diet"
        }
        scores["random"] = {
            (r["model"], r["seed"]): r[key] for r in rows if r["method"] == "random"
        }
    mark = {True: "✓", False: "✗"}
    full = scores[(True, True, True)]
    head = " | ".join(models)
    lines = [
        f"| MF | TS | MS | {head} | mean | paired diff to full (mean ± std over seeds) |",
        "|---" * (4 + len(models) + 1) + "|",
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

    for mf, ts, ms in VARIANTS:
        lines.append(row(f"{mark[mf]} | {mark[ts]} | {mark[ms]}", scores[(mf, ts, ms)]))
    lines.append(row("Random | | ", scores["random"]))
    text = (
        f"## Table 4 (validation AUC, {'after the fine-tune' if _FINETUNE.value else 'rows only'}"
        f"; seeds {seeds}; load {os.getloadavg()[0]:.1f}, shared CPU)\n\n" + "\n".join(lines) + "\n"
    )
    path = os.path.join(sh.root, "table4_ft.md" if _FINETUNE.value else "table4.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    app.run(main)
