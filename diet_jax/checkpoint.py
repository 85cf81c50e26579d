"""Orbax helpers: one-off saves of a pytree to a folder, restored into a known structure.

Orbax writes to a temporary folder and renames it when the save is complete, so a folder that
exists is a finished checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from diet_jax import parallel


def exists(path: str) -> bool:
    return os.path.isdir(path) and not os.path.basename(path).startswith(".")


def save(path: str, tree) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tree = parallel.globalize(tree)  # multi-host: every process saves its shards together
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)
        ckptr.wait_until_finished()


def restore(path: str, like):
    """Restores the checkpoint at `path` with the structure, shapes and dtypes of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, parallel.globalize(like))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), abstract)
