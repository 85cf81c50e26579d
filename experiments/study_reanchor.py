"""Re-anchoring the memory to the newest teacher: does it help, and is it DIET or the anchoring?

    python experiments/study_reanchor.py --base=/tmp/full/run --models=dcn,finalnet,wukong_small

`--base`: a finished run of `configs/synthetic.py` with `distill.reanchor = "off"` (its store,
teachers, Random rows and phase-2 memory are read, never written). Every carried row of a
memory sits in the embedding space of the teacher of its stage (phi_1 for stage 1) with that
teacher's soft label; the candidates train under phi_T's table. This script builds, from the
same rows:

- `random`, `diet`: the memories as the base run has them (stage teachers);
- `random_re`, `diet_re0`: every row re-embedded and relabelled by phi_T
  (`phase1.reanchor(..., "replace")` applied stage by stage, as the pipeline does);
- `diet_re`: the same keeping what phase 2's refinement added (`"offsets"`).

Each memory trains the same candidates (fresh dense networks under phi_T's table, up to
evaluate.max_epochs epochs, best epoch by validation AUC) at one learning rate for every seed;
the figure is that best-epoch AUC on the whole validation day (`evaluate.val_rows = 0`). The
test day is never read. `random_re` is the control: Random's rows with the same anchoring,
which separates what re-anchoring gives from what DIET's selection and refinement give.
"""

import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data.store import StageStore
from diet_jax.distill import driver, phase1
from diet_jax.distill import memory as memory_lib
from diet_jax.evaluate import pool, protocol
from diet_jax.io_utils import atomic_write_json
from diet_jax.train.reference import train_reference

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file of the base run.", lock_config=False
)
_BASE = flags.DEFINE_string("base", None, "A finished run with reanchor off.", required=True)
_MODELS = flags.DEFINE_list("models", ["dcn", "finalnet", "wukong_small"], "Candidates.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Candidate seeds.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam step of the candidates on the rows.")
_OUT = flags.DEFINE_string("out", "", "JSON output ('' = <base>/study_reanchor.json).")


def reanchored_to_final(memory, ref, store, mode: str, batch_size: int):
    """Every row moved stage by stage to phi_T's space, as the pipeline's fusion does."""

    def rows_of(origin, rows):
        return store.stage(ref.stage_names[origin - 1]).x_NxF[rows]

    for t in range(2, len(ref.stage_names) + 1):
        older = memory.replace(row_N=np.where(np.asarray(memory.origin_N) < t, memory.row_N, -1))
        moved = phase1.reanchor(
            ref.model, ref.stage_state(t), ref.stage_state(t - 1), older, rows_of, mode, batch_size
        )
        memory = moved.replace(row_N=memory.row_N)
    return memory


def main(_):
    config = _CONFIG.value
    config.progress = False
    config.evaluate.val_rows = 0  # the whole validation day: the differences are ~0.003
    base = _BASE.value
    store = StageStore(os.path.join(base, "data"))
    ref = train_reference(config, store, base)  # restores the base run's teachers
    bs = int(config.train.eval_batch_size)
    rand = memory_lib.load(os.path.join(base, "baselines", "random"))
    diet = driver.load_final(base)
    if np.asarray(diet.origin_N).min() == np.asarray(diet.origin_N).max():
        raise ValueError("The base run's memory has one stage of origin: nothing to re-anchor.")
    memories = {
        "random": rand,
        "random_re": reanchored_to_final(rand, ref, store, "replace", bs),
        "diet": diet,
        "diet_re0": reanchored_to_final(diet, ref, store, "replace", bs),
        "diet_re": reanchored_to_final(diet, ref, store, "offsets", bs),
    }
    cands = {c.name: c for c in pool.candidates(config)}
    seeds = [int(s) for s in _SEEDS.value]
    table = {}
    for name in _MODELS.value:
        model = pool.build(cands[name], config, store.feature_map)
        val = protocol.validation_rows(model, ref.final.params["embed"], store, config)
        for key, mem in memories.items():
            out = protocol.train_rows_group(
                model, [mem.trainable()] * len(seeds), seeds, [_LR.value] * len(seeds), val, config
            )
            best = np.nanmax(out["val_auc"], axis=1)
            table.setdefault(name, {})[key] = best.tolist()
            print(f"{name} {key}: {best.round(4).tolist()} mean {best.mean():.4f}", flush=True)
    keys = list(memories)
    print("\nvalidation AUC (whole day), mean ± std over seeds")
    print("| model | " + " | ".join(keys) + " | diet_re0 - random_re |")
    print("|---|" + "---|" * (len(keys) + 1))
    for name, row in table.items():
        cells = [f"{np.mean(row[k]):.4f} ± {np.std(row[k], ddof=1):.4f}" for k in keys]
        diff = np.asarray(row["diet_re0"]) - np.asarray(row["random_re"])
        print(
            f"| {name} | " + " | ".join(cells) + f" | {diff.mean():+.4f} ± {diff.std(ddof=1):.4f} |"
        )
    atomic_write_json(_OUT.value or os.path.join(base, "study_reanchor.json"), table)


if __name__ == "__main__":
    app.run(main)
