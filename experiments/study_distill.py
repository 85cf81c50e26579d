"""The distillation study (docs/distillation.md "Study"): groups of DIET variants vs Random.

    nice -n 10 python experiments/study_distill.py --group=percentile --models=dcn --seeds=0
    nice -n 10 python experiments/study_distill.py --group=confirm --models=dcn,finalnet,wukong \
        --seeds=0,1

Every variant runs through `study_harness.run_variant` (shared store and teacher under --root,
results cached there, VALIDATION AUC only) and each group's table is written to
`<root>/<group>.md` and printed. A variant is (name, overrides of the base config); the names
are cache keys, so a group rerun only computes what is missing.
"""

import os

import study_harness as H
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/synthetic.py", "Config file.", lock_config=True
)
_ROOT = flags.DEFINE_string("root", "/tmp/study/h", "Harness root.")
_GROUP = flags.DEFINE_string("group", "percentile", "Variant group (see GROUPS).")
_LR = flags.DEFINE_float("lr", 0.0, "Candidates' learning rate on the rows (0: config).")
_MODELS = flags.DEFINE_string("models", "dcn", "Candidate backbones.")
_SEEDS = flags.DEFINE_string("seeds", "0", "Seeds.")
_SAME = flags.DEFINE_bool("same_size", True, "Also score Random at DIET's memory size.")
_FINETUNE = flags.DEFINE_bool("finetune", False, "Score after the subsequent-block fine-tune.")

P = "distill.percentile"
IT = "distill.outer_iterations"
LR = "distill.meta_lr_embed"
HF = "distill.hard_fraction"
RET = "distill.retention"

# The defaults before the study; every variant spells its settings out from here, so a group
# means the same whatever defaults.py says now.
OLD = {P: 0.9, IT: 20, LR: 3e-2, HF: 0.1, RET: "paper"}
# The study's chosen phase 1, meta step and meta-loss (the base of the budget curve).
BASE = {**OLD, P: 0.5, LR: 3e-3, HF: 1.0, RET: "cumulative"}

GROUPS = {
    # Phase 1 alone (one outer iteration ~ no refinement): the EL2N percentile.
    "percentile": [
        ("it1", {**OLD, IT: 1}),
        ("it1_p70", {**OLD, IT: 1, P: 0.7}),
        ("it1_p50", {**OLD, IT: 1, P: 0.5}),
        ("it1_p30", {**OLD, IT: 1, P: 0.3}),
    ],
    # Phase 2 at the old budget (20 iterations): step size, what is learned, the meta-loss.
    "refine": [
        ("default", OLD),
        ("p50_it20", {**OLD, P: 0.5}),
        ("p50_lre3", {**OLD, P: 0.5, LR: 3e-3}),
        ("p50_nolab", {**OLD, P: 0.5, "distill.learn_labels": False}),
        ("p50_labonly", {**OLD, P: 0.5, LR: 1e-9}),
        ("p50_lre3_hf1", {**OLD, P: 0.5, LR: 3e-3, HF: 1.0}),
        ("p50_teach", {**OLD, P: 0.5, "distill.influence_at": "teacher"}),
    ],
    # Quality against budget, at the chosen phase 1 / step / meta-loss (cumulative retention).
    "budget": [
        ("p50_cum_it1", {**OLD, IT: 1, P: 0.5, RET: "cumulative"}),
        ("b_it20", {**BASE, IT: 20}),
        ("b_it60", {**BASE, IT: 60}),
        ("b_it150", {**BASE, IT: 150}),
        ("b_it20_a200", {**BASE, IT: 20, "distill.active_size": 200}),
        ("b_it20_m20w10", {**BASE, IT: 20, "distill.inner_steps": 20, "distill.window": 10}),
    ],
    # Before / after on every backbone (--models=dcn,dcnv2,finalnet,finalmlp,wukong --seeds=0,1).
    "confirm": [
        ("default", OLD),
        ("chosen", {**BASE, IT: 10}),
    ],
    # The percentile again on the history-matters stream, everything else at the new defaults.
    "recheck": [
        ("chosen", {**BASE, IT: 10}),
        ("chosen_p90", {**BASE, IT: 10, P: 0.9}),
        ("chosen_p30", {**BASE, IT: 10, P: 0.3}),
    ],
    # Memory fusion's retention rule at t > 1.
    "retention": [
        ("it1_p50", {**OLD, IT: 1, P: 0.5}),
        ("p50_cum_it1", {**OLD, IT: 1, P: 0.5, RET: "cumulative"}),
    ],
    # Addressing at phi_t (the paper) against theta_0, at the chosen settings.
    "influence": [
        ("chosen", {**BASE, IT: 10}),
        ("chosen_teacher", {**BASE, IT: 10, "distill.influence_at": "teacher"}),
        ("chosen_ms0", {**BASE, IT: 10, "distill.memory_selection": False}),
    ],
}


def main(_):
    logging.set_verbosity(logging.WARNING)
    sh = H.setup(_CONFIG.value, _ROOT.value, _LR.value)
    models, seeds = _MODELS.value.split(","), [int(s) for s in _SEEDS.value.split(",")]
    key = "val_auc_ft" if _FINETUNE.value else "val_auc_rows"
    parts = [f"## {_GROUP.value} ({key}; models {models}; seeds {seeds})"]
    for name, overrides in GROUPS[_GROUP.value]:
        rows = H.run_variant(
            sh, name, overrides, models, seeds, finetune=_FINETUNE.value, same_size=_SAME.value
        )
        parts.append(H.format_summary(f"{name} {overrides}", H.summary(rows, name, key)))
        print(parts[-1], flush=True)
    text = "\n\n".join(parts) + f"\n\n(load {os.getloadavg()[0]:.1f}, shared CPU)\n"
    path = os.path.join(sh.root, f"{_GROUP.value}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    app.run(main)
