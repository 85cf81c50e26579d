"""Table 4: ablation of memory fusion (MF), target selection (TS) and memory selection (MS).

    python experiments/table4.py --config=configs/synthetic.py --workdir=runs/table4 --model=wukong

Each variant distills again (data and teacher shared) and trains the candidate model on its
memory under the usual protocol. A switched-off component falls back to its plain variant:
no fusion (memory from the current stage only), random hard targets, random active memory.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from diet_jax.evaluate import sweep
from diet_jax.io_utils import atomic_write_text

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/table4", "Root of the ablation (resumable).")
_MODEL = flags.DEFINE_string("model", "wukong", "Candidate model.")

# The rows of the paper's Table 4, in its order: (MF, TS, MS).
VARIANTS = (
    (False, True, True),
    (True, False, True),
    (True, True, False),
    (False, False, False),
    (True, True, True),
)


def main(_):
    config, root = _CONFIG.value, _WORKDIR.value
    mark = {True: "✓", False: "✗"}
    lines = ["| MF | TS | MS | AUC | LogLoss |", "|---|---|---|---|---|"]
    for mf, ts, ms in VARIANTS:
        res = sweep.shared_run(
            config,
            root,
            f"mf{int(mf)}_ts{int(ts)}_ms{int(ms)}",
            {
                "distill.memory_fusion": mf,
                "distill.target_selection": ts,
                "distill.memory_selection": ms,
                "evaluate.models": (_MODEL.value,),
                "evaluate.methods": ("diet",),
            },
        )
        r = next(r for r in res["results"] if r["method"] == "diet")
        lines.append(
            f"| {mark[mf]} | {mark[ts]} | {mark[ms]} | {r['auc']:.4f} | {r['logloss']:.4f} |"
        )
    text = f"## Table 4 ({_MODEL.value})\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(root, "table4.md"), text)
    print(text)


if __name__ == "__main__":
    app.run(main)
