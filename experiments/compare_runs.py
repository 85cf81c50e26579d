"""Two runs of one config, entry by entry: which entries a setting changed, and by how much.

    python experiments/compare_runs.py --base=W --variant=W2

For every (method, candidate) entry both runs hold: identical (every seed's test AUC equal to
the last digit) or changed; for each changed entry its chosen learning rate in either run and
the change of its seed-mean validation and test AUC; then, per method, the change of its
pool mean on both days. Meant for settings that should change little (a pruned rate grid, a
faster path): the pipeline is deterministic on one machine, so an identical entry is one the
setting did not touch.
"""

import os

import numpy as np
from absl import app, flags

from diet_jax import results

_BASE = flags.DEFINE_string("base", None, "the base run's workdir", required=True)
_VARIANT = flags.DEFINE_string("variant", None, "the variant run's workdir", required=True)


def entries(workdir: str) -> dict:
    path = os.path.join(workdir, results.FILENAME)
    if not os.path.exists(path):
        raise SystemExit(f"No {results.FILENAME} in {workdir}: is it a finished run's workdir?")
    res = results.read(path)  # nulls back as NaN, as the run held them
    return {(e["method"], e["model"]): e for e in res["results"] if "per_seed" in e}


def day_mean(entry: dict, key: str) -> float:
    if any(key not in p for p in entry["per_seed"]):
        raise SystemExit(
            f"{entry['method']}/{entry['model']} has no per-seed {key!r}: a results.json from "
            "before the key; rerun that entry (evaluate.rerun=True)."
        )
    return float(np.mean([p[key] for p in entry["per_seed"]]))


def main(_):
    base, variant = entries(_BASE.value), entries(_VARIANT.value)
    keys = sorted(set(base) & set(variant))
    if not keys:
        raise SystemExit("The two runs share no candidate entry.")
    changed = [
        k
        for k in keys
        if [p["auc"] for p in base[k]["per_seed"]] != [p["auc"] for p in variant[k]["per_seed"]]
    ]
    print(f"{len(keys) - len(changed)} of {len(keys)} entries identical, {len(changed)} changed")
    if changed:
        print("\n| method / candidate | rate: base -> variant | validation change | test change |")
        print("|---|---|---|---|")
    for k in changed:
        b, v = base[k], variant[k]
        rate = f"{b['per_seed'][0].get('lr', float('nan')):g} -> "
        rate += f"{v['per_seed'][0].get('lr', float('nan')):g}"
        dv = day_mean(v, "val_auc") - day_mean(b, "val_auc")
        dt = day_mean(v, "auc") - day_mean(b, "auc")
        print(f"| {k[0]} / {k[1]} | {rate} | {dv:+.4f} | {dt:+.4f} |")
    print("\n| method | pool mean, validation: variant - base | test: variant - base |")
    print("|---|---|---|")
    for method in sorted({m for m, _ in keys}):
        ks = [k for k in keys if k[0] == method]
        dv = np.mean([day_mean(variant[k], "val_auc") - day_mean(base[k], "val_auc") for k in ks])
        dt = np.mean([day_mean(variant[k], "auc") - day_mean(base[k], "auc") for k in ks])
        print(f"| {method} | {dv:+.4f} | {dt:+.4f} |")


if __name__ == "__main__":
    app.run(main)
