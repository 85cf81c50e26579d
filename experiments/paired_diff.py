"""A variant rerun against its base run, candidate by candidate, paired by seed.

    python experiments/paired_diff.py --base=W --variant=W2 \\
        --models=dcn,dcnv2,finalnet,finalmlp,wukong

For each model that both runs hold: the base's `--method` (default diet), the variant's, and the
`--against` (default random; the base's, or with `--against_from=variant` the variant's), mean
over seeds; then over those models, variant - base and variant - against on the pool mean,
paired by seed (± standard error). Both the validation day (`val_auc`, where a setting may be
chosen) and the test day are printed.
"""

import json
import os

import numpy as np
from absl import app, flags

from diet_jax.evaluate import fidelity

_BASE = flags.DEFINE_string("base", None, "the base run's workdir", required=True)
_VARIANT = flags.DEFINE_string("variant", None, "the variant rerun's workdir", required=True)
_MODELS = flags.DEFINE_list("models", [], "candidates to compare (default: every one both hold)")
_METHOD = flags.DEFINE_string("method", "diet", "the method the variant reran")
_AGAINST = flags.DEFINE_string("against", "random", "the base method to compare with")
_AGAINST_FROM = flags.DEFINE_enum(
    "against_from",
    "base",
    ["base", "variant"],
    "the run whose --against entry is used: 'variant' when the variant reran it too (a control)",
)


def per_seed(res: dict, method: str, model: str, day: str) -> np.ndarray | None:
    """The entry's per-seed AUCs on `day`, in seed order; None if the run lacks it."""
    for e in res["results"]:
        if e["method"] == method and e["model"] == model and "per_seed" in e:
            seeds = sorted(e["per_seed"], key=lambda p: p["seed"])
            if any(day not in p for p in seeds):
                raise SystemExit(
                    f"{method}/{model} has no per-seed {day!r} in {res['_path']}: a results.json "
                    "written before the per-seed validation AUC was recorded; rerun that entry "
                    "(--config.evaluate.rerun=True)."
                )
            return np.array([p[day] for p in seeds])
    return None


def mean_se(x: np.ndarray) -> str:
    """Mean ± standard error over seeds."""
    mean, std = fidelity.seed_stats(x)
    return f"{mean:+.4f} ± {std / np.sqrt(len(x)):.4f}"


def main(_):
    def load(workdir):
        path = os.path.join(workdir, "results.json")
        with open(path) as f:
            return {**json.load(f), "_path": path}

    base, var = load(_BASE.value), load(_VARIANT.value)
    against = var if _AGAINST_FROM.value == "variant" else base
    models = _MODELS.value or sorted({e["model"] for e in var["results"]})
    m, a = _METHOD.value, _AGAINST.value
    for day in ("val_auc", "auc"):
        print(f"## {'validation' if day == 'val_auc' else 'test'} day")
        kept = []
        for model in models:
            b, v, r = (
                per_seed(base, m, model, day),
                per_seed(var, m, model, day),
                per_seed(against, a, model, day),
            )
            if b is None or v is None or r is None:
                continue
            kept.append((b, v, r))
            print(
                f"  {model}: base {b.mean():.4f}  variant {v.mean():.4f}  {a} {r.mean():.4f}"
                f"  | variant - base {np.mean(v - b):+.4f}  variant - {a} {np.mean(v - r):+.4f}"
            )
        if not kept:
            print("  no model held by both runs")
            continue
        b, v, r = (np.mean([k[i] for k in kept], 0) for i in range(3))
        print(
            f"  pool of {len(kept)}: base {b.mean():.4f}  variant {v.mean():.4f}  {a} {r.mean():.4f};"
            f" variant - base {mean_se(v - b)}; variant - {a} {mean_se(v - r)}"
        )


if __name__ == "__main__":
    app.run(main)
