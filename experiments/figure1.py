"""Figure 1: test AUC against training cost for every method over the candidate pool.

    python experiments/figure1.py --config=configs/synthetic.py --workdir=runs/synthetic
    python experiments/figure1.py --workdir=runs/synthetic --results_only

One point per method: the pool-mean test AUC (seed means) against the mean end-to-end training
seconds per candidate and seed, with error bars over seeds; each candidate is a small dot. Uses
the run in --workdir (running or resuming it unless --results_only, which only reads its
results.json) and writes figure1.png there, plus the reduced-vs-full scatter
figure1_reduced_vs_full.png; report.md embeds both.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from diet_jax import pipeline
from diet_jax import results as results_lib
from diet_jax.evaluate import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "Run directory (resumable).")
_RESULTS_ONLY = flags.DEFINE_bool(
    "results_only", False, "Only read <workdir>/results.json; train nothing."
)


def main(_):
    workdir = _WORKDIR.value
    if _RESULTS_ONLY.value:
        path = os.path.join(workdir, results_lib.FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No {path}; run the pipeline first.")
        res = results_lib.load_or_new(workdir)
    else:
        res = pipeline.run(_CONFIG.value, workdir)  # resumes: finished entries are skipped
    path = report.plot_auc_vs_cost(res["results"], os.path.join(workdir, "figure1.png"))
    report.plot_reduced_vs_full(
        res["results"], os.path.join(workdir, "figure1_reduced_vs_full.png")
    )
    report.write_report(workdir, res)
    print(f"wrote {path} and {os.path.join(workdir, 'report.md')}")
    for meth, p in report.cost_points(res["results"]).items():
        print(
            f"{meth:13s} AUC {p['auc']:.4f} ± {p['auc_err']:.4f}  "
            f"{p['seconds']:.2f} ± {p['seconds_err']:.2f} s  ({p['candidates']} candidates)"
        )


if __name__ == "__main__":
    app.run(main)
