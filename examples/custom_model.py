"""Bring your own model: a DeepFM-style block, not in the zoo, as DIET's proxy and as a candidate.

    python examples/custom_model.py --config=configs/synthetic.py:tiny --workdir=/tmp/diet_custom

1. Runs the pipeline with `DeepFM` as the distillation proxy (config.distill.proxy_module):
   the teacher (the zoo's DCN) trains on the stream, phase 2 refines the memory by unrolling
   DeepFM, and the configured zoo candidates are evaluated as usual.
2. Evaluates DeepFM itself as a candidate on the run (diet_jax.evaluate_candidate), under
   DIET's distilled dataset and, for comparison, full data and random selection; the rows go
   into results.json and report.md beside the zoo's.
3. Prints the Table 3 layout with DeepFM's column next to the built-in ones.

Any --config.* override of diet_jax.main works here too; --methods picks the candidate's methods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class DeepFM(nn.Module):
    """DeepFM (Guo et al., 2017) as a representation for the shared MMoE head.

    FM part: the pairwise interactions of the F field embeddings, sum_{i<j} e_i * e_j, as a
    D-vector (0.5 [(sum_i e_i)^2 - sum_i e_i^2], the FM identity before its final sum), plus
    the first-order term sum_i <w, e_i>. Deep part: an MLP on the flattened embeddings. The
    representation h_BxH is their concatenation, H = D + 1 + hidden[-1].
    """

    hidden: Sequence[int] = (32, 16)

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        sum_BxD = jnp.sum(e_BxFxD, axis=1)
        fm_BxD = 0.5 * (sum_BxD**2 - jnp.sum(e_BxFxD**2, axis=1))
        first_Bx1 = jnp.sum(nn.Dense(1, name="first_order")(e_BxFxD), axis=1)
        x_BxP = e_BxFxD.reshape(e_BxFxD.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x_BxP = nn.relu(nn.Dense(width, name=f"deep_{i}")(x_BxP))
        return jnp.concatenate([fm_BxD, first_Bx1, x_BxP], axis=-1)


def main(argv) -> None:
    import logging as std_logging

    from absl import logging

    import diet_jax
    from diet_jax import io_utils
    from diet_jax.evaluate import report

    del argv
    logging.set_verbosity(logging.INFO)
    # As diet_jax.main: Orbax logs every file it writes at INFO.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname
    )
    io_utils.enable_compilation_cache()  # as diet_jax.main
    config, workdir = _CONFIG.value, _WORKDIR.value

    # 1. The pipeline, with DeepFM (this file's class) as the distillation proxy.
    if not config.distill.proxy_module:
        config.distill.proxy_module = f"{os.path.abspath(__file__)}:DeepFM"
    diet_jax.run(config, workdir)

    # 2. DeepFM as a candidate on the run's distilled dataset, and on the baselines' data.
    for method in _METHODS.value:
        row = diet_jax.evaluate_candidate(workdir, DeepFM(), method=method, save=True)
        print(f"deepfm / {method}: test AUC {row['auc']:.4f} ({row['train_seconds']:.1f}s)")

    # 3. The table, DeepFM's column beside the zoo's.
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    print(report.table3(res["results"]))
    print(f"report: {os.path.join(workdir, 'report.md')}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/synthetic.py:tiny", "Config file.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes its artifacts.")
    _METHODS = flags.DEFINE_list(
        "methods", ["full_data", "random", "diet"], "Methods DeepFM is evaluated under."
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
