"""Artifact fingerprints: a hash of exactly the config keys an artifact depends on, and of its
inputs' fingerprints.

Every artifact of a run (the stage store, teacher stages, phase-1 memories, phase-2 checkpoints
and memories, selection-baseline rows, candidate results) records its fingerprint; a rerun
reuses an artifact only when the fingerprint it would compute now is the recorded one. Since an
artifact's fingerprint includes its inputs' fingerprints, a change anywhere upstream reaches
everything downstream. Pure functions only: the files live in `checkpoint.py`.

`KEYS` lists, per artifact kind, the config keys it depends on as *prefixes*: "data" covers every
`data.*` key, so a key that a config file or another module adds to a section is covered without
editing this table. A pattern ending in "*" is a plain string prefix ("evaluate.kmeans_*").
`EXCLUDE` removes keys that never change an artifact's content (where things are written, how
progress is shown, whether finished work is redone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

# The config keys (prefixes) that each artifact kind depends on. Inputs (upstream fingerprints)
# are passed separately: store -> teacher -> phase1/phase2 -> candidates; teacher -> selection.
KEYS: dict[str, tuple[str, ...]] = {
    # The stage store: only the data section.
    "store": ("data",),
    # Teacher stages phi_t: initialisation seed, architecture, optimiser, batches.
    "teacher": ("seed", "model", "teacher", "train"),
    # Phase 1 of a stage (boundary memory): budget, EL2N rank, fusion, scoring batches.
    "phase1": (
        "ratio",
        "distill.percentile",
        "distill.strata",  # phase 1's rows spread over score levels
        "distill.strata_pick",  # where in each score range (random: config.seed is an input)
        "distill.group_split",
        "distill.memory_fusion",
        "distill.retention",  # how many earlier rows the stage's memory keeps
        "distill.reanchor",  # carried rows moved into phi_t's space
        "distill.label_mix",  # new rows' soft labels pulled toward their hard labels
        "distill.chunk_size",
        "train.eval_batch_size",
    ),
    # Phase 2 of a stage (checkpoints and the refined memory): every distillation setting, the
    # memory sizes (ratio) and the real minibatch (train.batch_size when distill.batch_size = 0).
    "phase2": ("seed", "ratio", "distill", "train.batch_size"),
    # Selection-baseline rows (random, el2n, kmeans): every evaluate.* key, so that a key the
    # selection code starts to read is covered (rows are cheap next to the candidates, which
    # every evaluate.* change recomputes anyway).
    "selection": ("seed", "ratio", "evaluate", "train.eval_batch_size"),
    # A candidate result (method, model) in results.json: the candidate's model and training.
    "candidate": ("seed", "model", "train", "evaluate"),
}

# Keys that never change what an artifact holds.
EXCLUDE: tuple[str, ...] = (
    "progress",
    "data.store_dir",  # where the store lives, not what it holds
    "teacher.checkpoint_dir",
    "train.log_every",
    # A skip_batch artifact equals a stop one unless a batch was skipped, and a stopped phase
    # leaves no artifact: switching policy after a NaN reuses the good stages.
    "train.nan_policy",
    "train.inject_nan",  # test switch, read like nan_policy
    "distill.log_every",
    "distill.checkpoint_every",  # resume is exact, so checkpoint spacing does not matter
    "evaluate.rerun",
    "evaluate.methods",  # which candidates run, not what one of them gives
    "evaluate.models",
    "parallel",  # how the work is laid out over devices
)


# Keys added after artifacts existed, at the value that reproduces what those artifacts hold:
# left out of the hash at that value, so that upgrading the code does not invalidate a run.
NEUTRAL: dict[str, Any] = {
    "distill.label_mix": 0.0,
    "distill.strata": 1,
    "distill.refine": True,
    "distill.strata_pick": "middle",
    "evaluate.distill_per_seed": False,
    "evaluate.selection_label_mix": 0.0,
    "evaluate.lr_select": "rows",
    "evaluate.lr_select_top": 0,
    # No pruning of the rate grid (stop 35): what every earlier run did, whatever keep says.
    "evaluate.lr_prune_epochs": 0,
    "evaluate.lr_prune_keep": 3,
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; ConfigDicts, dicts and plain values; tuples become lists."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    out: dict[str, Any] = {}
    for key in sorted(tree):
        value, name = tree[key], f"{prefix}{key}"
        if hasattr(value, "to_dict") or isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = _canonical(value)
    return out


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def matches(key: str, pattern: str) -> bool:
    """`pattern` covers `key`: the key itself, a section ("data" covers "data.x"), or, with a
    trailing "*", any key that starts with the rest."""
    if pattern.endswith("*"):
        return key.startswith(pattern[:-1])
    return key == pattern or key.startswith(pattern + ".")


def select(config, patterns: Iterable[str], exclude: Iterable[str] = EXCLUDE) -> dict[str, Any]:
    """The flat {key: value} of the config keys that `patterns` cover, minus `exclude`."""
    patterns, exclude = tuple(patterns), tuple(exclude)
    return {
        k: v
        for k, v in flatten(config).items()
        if any(matches(k, p) for p in patterns) and not any(matches(k, p) for p in exclude)
    }


def other_backbones(name: str) -> tuple[str, ...]:
    """Exclusions for an artifact of backbone `name`: the other backbones' `model.<b>` sections
    (the teacher, a DCN, does not depend on `model.wukong.*`); shared model keys stay."""
    from diet_jax.models.factory import BACKBONES

    return tuple(f"model.{b}" for b in BACKBONES if b != name) + ("model.name",)


def fingerprint(
    config,
    keys: Iterable[str] | str,
    inputs: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = (),
) -> dict:
    """{"fingerprint": hex, "keys": {key: value}, "inputs": {name: fingerprint}}.

    `keys`: patterns, or the name of a row of `KEYS`. `inputs`: upstream fingerprints (hex
    strings, or None for an input without one). `exclude`: patterns removed on top of `EXCLUDE`.
    The record is what an artifact stores, so that a later mismatch can name the keys and
    inputs that changed (`changes`).
    """
    if isinstance(keys, str):
        keys = KEYS[keys]
    chosen = {
        k: v
        for k, v in select(config, keys, EXCLUDE + tuple(exclude)).items()
        if not (k in NEUTRAL and v == NEUTRAL[k])
    }
    record = {"keys": chosen, "inputs": dict(sorted((inputs or {}).items()))}
    text = json.dumps(record, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:20], **record}


def changes(old: Mapping | None, new: Mapping) -> list[str]:
    """Names of what differs between two fingerprint records: config keys, then "input X"."""
    if not old:
        return ["no fingerprint recorded"]
    out = []
    ok, nk = old.get("keys", {}), new.get("keys", {})
    for k in sorted(set(ok) | set(nk)):
        if ok.get(k, "<unset>") != nk.get(k, "<unset>"):
            out.append(f"{k}: {ok.get(k, '<unset>')!r} -> {nk.get(k, '<unset>')!r}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    out += [f"input {k}" for k in sorted(set(oi) | set(ni)) if oi.get(k) != ni.get(k)]
    if not out and old.get("fingerprint") != new.get("fingerprint"):
        out.append("fingerprint format")
    return out
