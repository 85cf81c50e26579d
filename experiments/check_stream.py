"""Does history matter on the synthetic stream? Full Data vs Warmup Start vs Random over seeds.

    python experiments/check_stream.py --config=configs/synthetic.py --workdir=/tmp/stream/check
    python experiments/check_stream.py --config=configs/synthetic.py:tiny --seeds=2 ...

One stage store and one teacher (seed `config.seed`) are shared; every seed s retrains each
candidate (`protocol.run_candidate`: init and data order from s) and redraws Random's rows
(selection seed from s). Prints the mean and std (ddof=1) of the test AUC per method and the
two criteria of issue 12: Full Data - Warmup >= 3 x max(std), and Full Data - Random > 0 by
more than its standard error. Writes check_stream.json under the workdir.
"""

import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data import prepare
from diet_jax.evaluate import methods, protocol
from diet_jax.io_utils import atomic_write_text
from diet_jax.models import build_model
from diet_jax.train.reference import train_reference

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/stream/check", "Run directory.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method.")
_MODEL = flags.DEFINE_string("model", "dcn", "Candidate backbone.")
_METHODS = ("full_data", "warmup_start", "random")


def main(_):
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    store = prepare.prepare(config, workdir)
    data_s = time.perf_counter() - t0
    ref = train_reference(config, store, workdir)
    model = build_model(config.model, store.feature_map, name=_MODEL.value)
    teacher_embed = ref.final.params["embed"]
    auc = {m: [] for m in _METHODS}
    for s in range(_SEEDS.value):
        cfg = config.copy_and_resolve_references()
        cfg.seed = config.seed + s
        rows = methods.selection_memory("random", cfg, store, ref).trainable()
        for m in _METHODS:
            out = protocol.run_candidate(
                m,
                model,
                store,
                cfg,
                teacher_embed,
                rows if m == "random" else None,
                seed=cfg.seed,
                embed_opt=protocol.inherited_embed_opt(ref.final, cfg),
            )
            auc[m].append(float(out.metrics["auc"]))
            print(f"seed {cfg.seed} {m:13s} test AUC {auc[m][-1]:.4f} ({out.train_seconds:.1f}s)")
    mean = {m: float(np.mean(v)) for m, v in auc.items()}
    std = {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in auc.items()}
    gap_warm = mean["full_data"] - mean["warmup_start"]
    gap_rand = mean["full_data"] - mean["random"]
    worst_std = max(std["full_data"], std["warmup_start"])
    se_rand = float(np.sqrt((std["full_data"] ** 2 + std["random"] ** 2) / _SEEDS.value))
    out = {
        "auc": auc,
        "mean": mean,
        "std": std,
        "full_minus_warmup": gap_warm,
        "full_minus_random": gap_rand,
        "history_matters": bool(gap_warm >= 3 * worst_std and gap_warm > 0),
        "random_below_full": bool(gap_rand > 2 * se_rand),
        "oracle_test_auc": store.feature_map.extra.get("oracle", {}).get("test", {}).get("auc"),
        "data_seconds": data_s,
        "teacher_seconds": ref.train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "loadavg": os.getloadavg(),
    }
    for m in _METHODS:
        print(f"{m:13s} mean {mean[m]:.4f} std {std[m]:.4f}")
    print(
        f"full - warmup {gap_warm:.4f} (3 x std {3 * worst_std:.4f}): {out['history_matters']}; "
        f"full - random {gap_rand:.4f} (2 x s.e. {2 * se_rand:.4f}): {out['random_below_full']}"
    )
    print(
        f"oracle test AUC {out['oracle_test_auc']}; {out['total_seconds']:.0f}s; "
        f"loadavg {out['loadavg']} (shared CPU)"
    )
    atomic_write_text(os.path.join(workdir, "check_stream.json"), json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
