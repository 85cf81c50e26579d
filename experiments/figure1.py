"""Figure 1: reduced-data AUC against full-data AUC, one point per (method, model).

    python experiments/figure1.py --config=configs/synthetic.py --workdir=runs/table3

Uses the run in --workdir (running or resuming it if needed) and writes figure1.png there.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from diet_jax import pipeline
from diet_jax.evaluate import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/table3", "Run directory (shared with table3.py).")


def main(_):
    res = pipeline.run(_CONFIG.value, _WORKDIR.value)  # resumes: finished entries are skipped
    path = report.plot_reduced_vs_full(res["results"], os.path.join(_WORKDIR.value, "figure1.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
