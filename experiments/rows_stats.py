"""What the reduced rows of a finished run look like: DIET's distilled rows against the rows the
selection baselines picked, all in the teacher's embedding space.

    python experiments/rows_stats.py --workdir=W

Per method: rows, the mean (and std over rows) L2 norm of each field's embedding, the mean and
std of the pairwise inner products between fields (what FM-style interaction layers such as
WuKong's multiply), and the mean label per task (sigmoid of the stored logits: DIET's soft labels,
the teacher's on a selection's real rows). A scale or calibration shift of DIET's rows against
real ones shows here; docs/evaluation.md ("Measured") uses it to rule one out.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from diet_jax.distill import driver
from diet_jax.distill import memory as memory_lib

WORKDIR = flags.DEFINE_string("workdir", None, "a finished run", required=True)
METHODS = ("random", "kmeans", "el2n")


def row_stats(e_NxFxD: np.ndarray, logits_NxK: np.ndarray) -> dict:
    """Field norms, between-field inner products and mean labels of N embedded rows."""
    norm_NxF = np.linalg.norm(e_NxFxD, axis=-1)
    dots_NxFxF = np.einsum("nfd,ngd->nfg", e_NxFxD, e_NxFxD)
    i, j = np.triu_indices(e_NxFxD.shape[1], 1)
    pair = dots_NxFxF[:, i, j]
    return {
        "rows": e_NxFxD.shape[0],
        "norm_F": norm_NxF.mean(0),
        "pair_mean": float(pair.mean()),
        "pair_std": float(pair.std()),
        "label_K": (1.0 / (1.0 + np.exp(-logits_NxK))).mean(0),
    }


def main(_):
    w = WORKDIR.value
    memories = {"diet": driver.load_final(w)}
    for m in METHODS:
        path = os.path.join(w, "baselines", m)
        if memory_lib.exists(path):
            memories[m] = memory_lib.load(path)
    print(
        "| method | rows | field norm (mean over rows) | pairwise dot mean ± std | mean label per task |"
    )
    print("|---|---:|---|---|---|")
    for m, mem in memories.items():
        s = row_stats(np.asarray(mem.e_NxFxD, np.float32), np.asarray(mem.logits_NxK, np.float32))
        norms = " ".join(f"{v:.3f}" for v in s["norm_F"])
        labels = " ".join(f"{v:.4f}" for v in s["label_K"])
        print(
            f"| {m} | {s['rows']} | {norms} | {s['pair_mean']:+.4f} ± {s['pair_std']:.4f} "
            f"| {labels} |"
        )


if __name__ == "__main__":
    app.run(main)
