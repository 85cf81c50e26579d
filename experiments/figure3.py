"""Figure 3: candidate test AUC against the compression ratio.

    python experiments/figure3.py --config=configs/synthetic.py --workdir=runs/figure3 \
        --ratios=0.001,0.003,0.01,0.03 --model=wukong --methods=diet,random

One run per ratio (data and teacher shared), the chosen candidate model, the chosen methods, and
the full-data AUC as the dotted upper line. Writes figure3.png and figure3.json under --workdir.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from diet_jax.evaluate import report, sweep
from diet_jax.io_utils import atomic_write_json

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/figure3", "Root of the sweep (resumable).")
_RATIOS = flags.DEFINE_list("ratios", ["0.001", "0.003", "0.01", "0.03"], "Compression ratios.")
_MODEL = flags.DEFINE_string("model", "wukong", "Candidate model.")
_METHODS = flags.DEFINE_list("methods", ["diet", "random"], "Reduced-data methods to sweep.")


def main(_):
    config, root = _CONFIG.value, _WORKDIR.value
    points = []
    for ratio in map(float, _RATIOS.value):
        res = sweep.shared_run(
            config,
            root,
            f"ratio_{ratio:g}",
            {
                "ratio": ratio,
                "evaluate.models": (_MODEL.value,),
                "evaluate.methods": tuple(_METHODS.value),
            },
        )
        points += [
            {"series": r["method"], "ratio": ratio, "auc": r["auc"]}
            for r in res["results"]
            if r["method"] in _METHODS.value
        ]
    full = sweep.shared_run(
        config,
        root,
        "full_data",
        {"evaluate.models": (_MODEL.value,), "evaluate.methods": ("full_data",)},
    )
    full_auc = next(r["auc"] for r in full["results"] if r["method"] == "full_data")
    atomic_write_json(
        os.path.join(root, "figure3.json"),
        {"model": _MODEL.value, "points": points, "full_data_auc": full_auc},
    )
    path = report.plot_auc_vs_ratio(
        points,
        full_auc,
        os.path.join(root, "figure3.png"),
        f"{_MODEL.value}: AUC vs compression ratio",
    )
    for p in sorted(points, key=lambda p: (p["series"], p["ratio"])):
        print(f"{p['series']:>8} ratio {p['ratio']:<8g} AUC {p['auc']:.4f}")
    print(f"full_data AUC {full_auc:.4f}; wrote {path}")


if __name__ == "__main__":
    app.run(main)
