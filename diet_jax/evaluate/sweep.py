"""Runs of one config that differ in a few keys, sharing the data and the teacher.

The experiment scripts (ratio sweeps, ablations) vary only what comes after the reference model,
so every variant reads one stage store and one set of teacher checkpoints under `<root>/shared`.
"""

from __future__ import annotations

import os

from diet_jax import pipeline


def set_path(config, path: str, value) -> None:
    """config["a.b.c"] = value for an existing key; a typo is an error, as on the command line."""
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"Unknown config key {path!r}.")
    node[leaf] = value


def shared_run(config, root: str, name: str, overrides: dict | None = None) -> dict:
    """pipeline.run on a copy of `config` with `overrides`, in <root>/<name>, sharing data and teacher."""
    cfg = config.copy_and_resolve_references()
    shared = os.path.join(root, "shared")
    if not cfg.data.store_dir:
        cfg.data.store_dir = os.path.join(shared, "data")
    if not cfg.teacher.checkpoint_dir:
        cfg.teacher.checkpoint_dir = os.path.join(shared, "teacher")
    for path, value in (overrides or {}).items():
        set_path(cfg, path, value)
    return pipeline.run(cfg, os.path.join(root, name))
