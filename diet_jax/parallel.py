"""Scale-out on JAX's own SPMD: a 1-D mesh with a `data` axis over the devices.

Batches are sharded along `data` (every device sees B / n rows), parameters, optimizer moments,
the distilled memory and the teacher contexts are replicated, and the compiler inserts the
all-reduces of the gradients and of the influence sums. With `parallel.shard_embeddings` the
embedding table (and every leaf shaped like it, such as its Adam moments) is row-sharded over the
same axis, or column-sharded when the rows do not divide evenly. Nothing here changes a step's
arithmetic: a sharded step computes the same numbers as the single-device one, up to the order
of floating-point sums.

Multi-host: `maybe_initialize_distributed(config)` calls `jax.distributed.initialize` when the
config asks; the mesh spans every process's devices, ordered by process, so each process holds a
contiguous block of every global batch (`local_rows`) and reads only those rows from the store;
`global_batch` assembles the global array from the process-local pieces. Only process 0 writes
files other than checkpoints (Orbax checkpoints are written by every process together).

Usage:

    mesh = parallel.mesh_from_config(config)  # None when config.parallel.enabled is False
    state = parallel.put(state, parallel.state_shardings(state, mesh, shard_embeddings=True))
    step = parallel.keep_shardings(train_step, state)  # outputs keep the state's layout
    for batch in loader.device_batches(stage, bs, shuffle=True, sharding=parallel.batch_sharding(mesh)):
        state, metrics = step(state, batch)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diet_jax.errors import ConfigError

DATA = "data"  # the mesh axis that batches are split along


# ------------------------------------------------------------------ processes


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on the one process that writes reports, results and metrics."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def main_first(fn: Callable, name: str):
    """Runs `fn` on process 0, then on the others once it is done: for work that writes shared
    files and finds them on a second call (the stage store)."""
    if jax.process_count() == 1:
        return fn()
    if is_main_process():
        out = fn()
        sync(name)
        return out
    sync(name)
    return fn()


def maybe_initialize_distributed(config) -> bool:
    """`jax.distributed.initialize` when `config.parallel.distributed` is set; True if done.

    Must run before anything touches a JAX device. Empty / 0 / -1 settings leave the value to
    JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...).
    """
    pc = config.get("parallel") if hasattr(config, "get") else None
    if pc is None or not pc.get("distributed", False):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if pc.coordinator_address:
        kwargs["coordinator_address"] = pc.coordinator_address
    if pc.num_processes > 0:
        kwargs["num_processes"] = pc.num_processes
    if pc.process_id >= 0:
        if pc.num_processes > 0 and pc.process_id >= pc.num_processes:
            raise ConfigError(
                f"config.parallel.process_id ({pc.process_id}) must be below "
                f"num_processes ({pc.num_processes})."
            )
        kwargs["process_id"] = pc.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            "jax.distributed.initialize failed; it must run before any JAX computation "
            f"(diet_jax.main calls it first). Settings: {kwargs or 'auto-detected'}. {e}"
        ) from e
    logging.info(
        "distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# ------------------------------------------------------------------ mesh


@functools.cache
def make_mesh(data_axis_size: int = 0) -> Mesh:
    """A 1-D mesh over the first `data_axis_size` devices (0: all), ordered by process.

    Auto axis types: the compiler propagates shardings from the inputs (GSPMD), so the existing
    jitted steps run unchanged on it.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = data_axis_size or len(devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(
            f"config.parallel.data_axis_size must lie in [0, {len(devices)}] (0 = every "
            f"device), got {data_axis_size}."
        )
    if n < len(devices) and jax.process_count() > 1:
        raise ConfigError(
            f"On {jax.process_count()} processes the data axis must span every device "
            f"({len(devices)}), got data_axis_size={data_axis_size}."
        )
    return Mesh(np.array(devices[:n]), (DATA,), axis_types=(AxisType.Auto,))


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[DATA]


def check_divisible(batch_size: int, mesh: Mesh | None, what: str) -> None:
    """Every device must get the same number of rows of a global batch."""
    n = data_size(mesh)
    if batch_size % n:
        raise ConfigError(
            f"{what} ({batch_size}) must be divisible by the data axis size ({n} devices): "
            f"pick a multiple of {n}, or set config.parallel.data_axis_size."
        )


def mesh_from_config(config) -> Mesh | None:
    """The run's mesh, or None when `config.parallel.enabled` is off (or the section is absent).

    Checks that every global batch size of the run divides over the data axis.
    """
    pc = config.get("parallel")
    if pc is None or not pc.enabled:
        return None
    mesh = make_mesh(int(pc.data_axis_size))
    check_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    check_divisible(config.train.eval_batch_size, mesh, "config.train.eval_batch_size")
    if "distill" in config and config.distill.get("batch_size", 0):
        check_divisible(config.distill.batch_size, mesh, "config.distill.batch_size")
    if "evaluate" in config and "rows_batch_size" in config.evaluate:
        check_divisible(config.evaluate.rows_batch_size, mesh, "config.evaluate.rows_batch_size")
    return mesh


# ------------------------------------------------------------------ shardings


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Leading (row) axis split along `data`; None without a mesh."""
    return None if mesh is None else NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, P())


def table_spec(shape: tuple[int, ...], n: int) -> P:
    """Rows over `data` if they divide evenly, else the columns (D), else replicated: XLA
    shardings must divide the dimension they split."""
    if shape[0] % n == 0:
        return P(DATA)
    if len(shape) == 2 and shape[1] % n == 0:
        return P(None, DATA)
    return P()


@functools.cache
def _log_once(message: str) -> None:
    logging.info(message)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def embedding_rows(tree) -> tuple[int, int] | None:
    """(V, D) of the first `embed/table` leaf in `tree`, or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = _path_keys(path)
        if len(keys) >= 2 and keys[-2:] == ("embed", "table"):
            return tuple(leaf.shape)
    return None


def state_shardings(tree, mesh: Mesh, *, shard_embeddings: bool = False):
    """A NamedSharding per leaf: replicated, except, with `shard_embeddings`, the embedding table
    and every leaf under an `embed` key with the table's leading size (its optimizer moments and
    row statistics), which are split like the table (`table_spec`)."""
    repl = NamedSharding(mesh, P())
    table = embedding_rows(tree) if shard_embeddings else None
    if table is None:
        if shard_embeddings:
            logging.warning("parallel: no embed/table leaf to shard; everything replicated.")
        return jax.tree.map(lambda _: repl, tree)
    n = data_size(mesh)
    spec = table_spec(table, n)
    if spec != P(DATA):
        _log_once(
            f"parallel: the embedding table {table} does not divide over {n} devices by rows; "
            + ("its columns are split." if spec != P() else "it stays replicated.")
        )

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if "embed" not in _path_keys(path) or not shape or shape[0] != table[0]:
            return repl
        if spec == P(DATA) or shape == table:
            return NamedSharding(mesh, spec)
        return repl  # a [V] row statistic when only the columns are split

    return jax.tree_util.tree_map_with_path(one, tree)


# ------------------------------------------------------------------ placement


def put(tree, shardings):
    """Places every leaf with its sharding (a pytree of shardings, or one for all leaves).

    On several processes each leaf must hold the same global value on every process (parameters
    initialised from one seed, a memory restored from disk): each process keeps its shards.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_put_global, tree, shardings)


def _put_global(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # reshard on the devices
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_replicated(tree, mesh: Mesh | None):
    """Every leaf replicated on the mesh (no-op without a mesh)."""
    return tree if mesh is None else put(tree, replicated(mesh))


def put_batch(batch, mesh: Mesh | None):
    """A global batch (every row, on every process) split along `data`; plain device_put
    without a mesh."""
    if mesh is None:
        return jax.device_put(batch)
    return put(batch, batch_sharding(mesh))


def local_rows(sharding, rows: int) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch of `rows` that this process's devices hold.

    (0, rows) on one process. On several, a contiguous block (the mesh is ordered by process).
    """
    if sharding is None or jax.process_count() == 1:
        return 0, rows
    spans = set()
    for idx in sharding.addressable_devices_indices_map((rows,)).values():
        s = idx[0]
        spans.add((s.start or 0, rows if s.stop is None else s.stop))
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"This process's rows of the batch are not contiguous: {sorted(spans)}.")
    return lo, hi


def global_batch(local, sharding, rows: int):
    """Assembles the global batch of `rows` rows from this process's block (`local_rows`)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a, (rows, *a.shape[1:])),
        local,
    )


def global_replicated() -> NamedSharding | None:
    """Replicated over every device of every process; None on one process."""
    if jax.process_count() == 1:
        return None
    return NamedSharding(make_mesh(0), P())


def globalize(tree):
    """Multi-host: arrays that live on one local device (host-local, like `jnp.asarray` of numpy
    data) become replicated global arrays, which Orbax can save and restore into; unchanged on
    one process (`diet_jax.checkpoint` calls it on what it saves and on restore templates)."""
    if jax.process_count() == 1:
        return tree
    repl = global_replicated()

    def one(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return _put_global(np.asarray(x), repl)
        return x

    return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
    """A device array as numpy on every process (gathers the other processes' rows)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------ steps


def keep_shardings(step: Callable, state, *, donate: bool = True) -> Callable:
    """`step(state, *args) -> (state, metrics)` re-jitted so that the new state has the
    shardings of `state` (a row-sharded table stays sharded, a replicated parameter stays
    replicated, so the donated buffers are reused) and the metrics are replicated.

    `step` may itself be jitted (it is inlined). Without a mesh on `state`, `step` is returned.
    """
    shardings = jax.tree.map(lambda a: a.sharding, state)
    leaves = jax.tree.leaves(shardings)
    if not leaves or not isinstance(leaves[0], NamedSharding):
        return step
    repl = NamedSharding(leaves[0].mesh, P())
    return jax.jit(step, out_shardings=(shardings, repl), donate_argnums=0 if donate else ())
