"""The synthetic memory D_syn^t: embedding rows, soft-label logits and where each row came from.

A `Memory` is a pytree; its trainable part is `{"e", "logits"}` (`trainable` / `replace`).
Rows live in the embedding space of the stage teacher's table, so any dense network trains on
them; `logits_NxK` are soft labels before the sigmoid. Saved with Orbax as a plain dict; `load`
reads shapes from the checkpoint's metadata, so a reader needs no config.
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diet_jax import checkpoint, parallel


@flax.struct.dataclass
class Memory:
    e_NxFxD: jax.Array  # float32 embeddings
    logits_NxK: jax.Array  # float32 soft labels (logits)
    origin_N: jax.Array  # int32 stage of origin, 1-based
    row_N: jax.Array  # int32 row in the stage of origin (-1 when unknown)

    def __len__(self) -> int:
        return int(self.e_NxFxD.shape[0])

    def trainable(self) -> dict:
        return {"e": self.e_NxFxD, "logits": self.logits_NxK}

    def with_trainable(self, syn: dict) -> Memory:
        return self.replace(e_NxFxD=syn["e"], logits_NxK=syn["logits"])

    def batch(self) -> dict:
        """As an influence batch: {"e", "y"} with y = sigmoid(soft logits)."""
        return {"e": self.e_NxFxD, "y": jax.nn.sigmoid(self.logits_NxK)}


def new(e_NxFxD, logits_NxK, origin: int | np.ndarray, rows_N=None) -> Memory:
    n = e_NxFxD.shape[0]
    if logits_NxK.shape[0] != n:
        raise ValueError(f"{n} embedding rows but {logits_NxK.shape[0]} label rows.")
    origin_N = np.broadcast_to(np.asarray(origin, np.int32), (n,))
    rows_N = np.full((n,), -1, np.int32) if rows_N is None else np.asarray(rows_N, np.int32)
    return Memory(
        on_device(e_NxFxD, np.float32),
        on_device(logits_NxK, np.float32),
        on_device(origin_N, np.int32),
        on_device(rows_N, np.int32),
    )


def on_device(a, dtype) -> jax.Array:
    """`a` as a jax.Array of `dtype`. A host array goes through `jax.device_put`, one copy: on
    the CPU `jnp.asarray` of a large numpy array peaks at two (measured: +392 MB for 191 MB),
    and the memory grows with the stream."""
    if isinstance(a, jax.Array):
        return a if a.dtype == dtype else a.astype(dtype)
    return jax.device_put(np.asarray(a, dtype))


def concat(*memories: Memory) -> Memory:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *memories)


def take(memory: Memory, idx_N) -> Memory:
    idx = jnp.asarray(idx_N, jnp.int32)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), memory)


def _as_dict(memory: Memory) -> dict:
    return {
        "e": memory.e_NxFxD,
        "logits": memory.logits_NxK,
        "origin": memory.origin_N,
        "row": memory.row_N,
    }


def save(path: str, memory: Memory) -> None:
    """Orbax save (temporary folder, then rename): a folder that exists is complete."""
    checkpoint.save(path, _as_dict(memory))


def exists(path: str) -> bool:
    return checkpoint.exists(path)


def _checked(path: str) -> str:
    path = os.path.abspath(path)
    if not exists(path):
        raise FileNotFoundError(f"No memory checkpoint at {path!r}.")
    return path


def rows(path: str) -> int:
    """How many rows the saved memory at `path` holds, from its metadata (nothing loaded)."""
    path = _checked(path)
    with ocp.StandardCheckpointer() as ckptr:
        return int(ckptr.metadata(path).item_metadata.tree["e"].shape[0])


def load(path: str) -> Memory:
    path = _checked(path)
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        sharding = parallel.global_replicated()  # None on one process; multi-host: replicated
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree
        )
        d = ckptr.restore(path, abstract)
    return Memory(d["e"], d["logits"], d["origin"], d["row"])
