"""How many rates `evaluate.lr_select = "final"` needs to fine-tune (`evaluate.lr_select_top`).

    python experiments/lr_select_top.py --workdir=W

W: a finished run with `evaluate.lr_select = "final"` and `evaluate.lr_select_top = 0` (every
rate of the grid fine-tuned on the first seed). For every reduced-method entry, the rank of the
rate that the full search chose (best fine-tuned model on validation) among the rates ordered by
their rows epochs' validation AUC (what `lr_select_top` keeps); then, for each k, in how many
entries the top k rates by the rows' AUC hold the full search's choice, i.e. give the same
result at k fine-tunes instead of len(grid).
"""

import collections
import json
import os

import numpy as np
from absl import app, flags

from diet_jax.evaluate import protocol


def choice_ranks(candidate_info: dict) -> dict[str, int]:
    """{"method/candidate": rank of the chosen rate by the rows' AUC (0 = the rows' choice)}."""
    ranks = {}
    for key, info in candidate_info.items():
        first = info[0] if info else {}
        final = first.get("lr_grid_final_val_auc")
        if final is None:
            continue
        if any(x is None for x in final):
            raise SystemExit(f"{key}: some rates were not fine-tuned (lr_select_top > 0).")
        chosen = protocol.select_lr(final, np.asarray(final, np.float64)[:, None])
        ranks[key] = protocol.rates_by_rows_auc(first["lr_grid_val_auc"]).index(chosen)
    return ranks


def main(_):
    with open(os.path.join(flags.FLAGS.workdir, "results.json")) as f:
        res = json.load(f)
    ranks = choice_ranks(res.get("candidate_info", {}))
    if not ranks:
        raise SystemExit("No entry with lr_grid_final_val_auc: run with evaluate.lr_select=final.")
    grid = len(res["candidate_info"][next(iter(ranks))][0]["lr_grid_val_auc"])
    count = collections.Counter(ranks.values())
    print(f"{len(ranks)} entries, a grid of {grid} rates")
    print("| rank of the chosen rate by the rows' AUC | entries |")
    print("|---|---|")
    for r in range(grid):
        print(f"| {r + 1} | {count.get(r, 0)} |")
    print("\n| lr_select_top | entries whose choice it keeps | extra fine-tunes per candidate |")
    print("|---|---|---|")
    for k in range(1, grid + 1):
        kept = sum(v < k for v in ranks.values())
        print(f"| {k} | {kept} of {len(ranks)} | {k - 1} |")
    for key, r in sorted(ranks.items()):
        if r > 0:
            print(f"  {key}: the rows' rank {r + 1}")


if __name__ == "__main__":
    # Defined here, not at import, so that tests can import the script beside diet_jax.main
    # (whose --workdir flag it would repeat).
    flags.DEFINE_string("workdir", None, "a run with lr_select=final, top 0", required=True)
    app.run(main)
