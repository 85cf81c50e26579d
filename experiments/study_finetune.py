"""What the subsequent-block fine-tune does to a candidate trained on reduced rows.

    python experiments/study_finetune.py --base=/tmp/full/run --models=dcn,wukong \\
        --lrs=1e-2,1e-3

`--base`: a finished run of the config (its store, teacher, DIET memory and Random rows are
read, never written). For every model, method (diet, random) and seed, a fresh dense network
trains on the rows as the protocol does (`protocol.train_rows_group`, best epoch by validation
AUC, at the model's `--lrs` rate), then the whole model is fine-tuned one epoch on the
subsequent block twice: with a fresh row-optimizer state for the inherited table, and with the
teacher's (`protocol.inherited_embed_opt`, `evaluate.inherit_optimizer`). Every figure is the
AUC on the whole validation day; the test day is never read. Prints a table and writes
`<base>/study_finetune.json`.
"""

import os

import numpy as np
import study_harness as H
from absl import app, flags
from ml_collections import config_flags

from diet_jax.data.store import StageStore
from diet_jax.distill import driver
from diet_jax.distill import memory as memory_lib
from diet_jax.evaluate import pool, protocol
from diet_jax.io_utils import atomic_write_json
from diet_jax.train import group, loop
from diet_jax.train.reference import train_reference

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file of the base run.", lock_config=False
)
_BASE = flags.DEFINE_string("base", None, "A finished run.", required=True)
_MODELS = flags.DEFINE_list("models", ["dcn", "wukong"], "Candidates.")
_LRS = flags.DEFINE_list("lrs", ["1e-2", "1e-3"], "Rows learning rate per model.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")


def finetuned_val_auc(model, params, state, store, config, seed, embed_opt) -> float:
    """The protocol's fine-tune (`protocol.finetune_and_test`), scored on the validation day."""
    subsequent = [s.name for s in store.feature_map.stages_with_role("subsequent")]
    metrics, _, _ = protocol.finetune_and_test(
        model,
        params,
        state,
        H.ValidationAsTest(store),
        config,
        seed,
        subsequent,
        embed_opt=embed_opt,
    )
    return metrics["auc"]


def validation_auc(model, params, state, store, config) -> float:
    return loop.evaluate(
        protocol._predict_step(model),
        params,
        state,
        store.stages("validation")[0],
        config.train.eval_batch_size,
        store.feature_map.tasks,
    )["auc"]


def main(_):
    if len(_LRS.value) != len(_MODELS.value):
        raise app.UsageError(
            f"--lrs needs one rate per model: {len(_MODELS.value)} models, {len(_LRS.value)} rates."
        )
    config = _CONFIG.value
    config.progress = False
    config.evaluate.val_rows = 0
    base = _BASE.value
    store = StageStore(os.path.join(base, "data"))
    ref = train_reference(config, store, base)
    embed = ref.final.params["embed"]
    teacher_opt = ref.final.opt_state["embed"]
    rows = {
        "diet": driver.load_final(base).trainable(),
        "random": memory_lib.load(os.path.join(base, "baselines", "random")).trainable(),
    }
    seeds = [int(s) for s in _SEEDS.value]
    cands = {c.name: c for c in pool.candidates(config)}
    table = {}
    for name, lr in zip(_MODELS.value, _LRS.value, strict=True):
        model = pool.build(cands[name], config, store.feature_map)
        val = protocol.validation_rows(model, embed, store, config)
        for method, r in rows.items():
            out = protocol.train_rows_group(
                model, [r] * len(seeds), seeds, [float(lr)] * len(seeds), val, config
            )
            cell = {"rows": [], "fresh": [], "inherited": []}
            for g, seed in enumerate(seeds):
                params = {"embed": embed, "dense": group.unstack(out["params"], g)}
                state = group.unstack(out["state"], g)
                cell["rows"].append(validation_auc(model, params, state, store, config))
                for key, opt in (("fresh", None), ("inherited", teacher_opt)):
                    cell[key].append(
                        finetuned_val_auc(model, params, state, store, config, seed, opt)
                    )
            table[f"{name}/{method}"] = cell
            print(name, method, {k: np.round(v, 4).tolist() for k, v in cell.items()}, flush=True)
    print("\nvalidation AUC (whole day), mean ± std over seeds")
    print(
        "| model / rows | after the rows | fine-tuned, fresh table state | fine-tuned, teacher's |"
    )
    print("|---|---|---|---|")
    for key, cell in table.items():
        cells = [f"{np.mean(cell[k]):.4f} ± {np.std(cell[k], ddof=1):.4f}" for k in cell]
        print(f"| {key} | " + " | ".join(cells) + " |")
    atomic_write_json(os.path.join(base, "study_finetune.json"), table)


if __name__ == "__main__":
    app.run(main)
