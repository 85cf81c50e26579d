"""grain pipelines over the memory-mapped stage store.

Items are whole batches: the pipeline maps a batch index to a gather of rows from the memmaps,
so there is no Python work per row. Shuffling is a permutation drawn from (seed, epoch), so an
epoch's batches are the same on every run and every machine. `device_batches` also transfers
each batch to the device inside grain's reader threads, so the thread that dispatches the train
steps only pops batches that are already there (measured in experiments/bench_sparse.py).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import grain
import jax
import numpy as np

from diet_jax import parallel
from diet_jax.data.store import Stage


class _GatherBatch(grain.transforms.Map):
    """Batch index -> {"x": int32 [B, F], "y": uint8 [B, K], "w": float32 [B]}."""

    def __init__(
        self,
        stage: Stage,
        order_N: np.ndarray,
        batch_size: int,
        pad: bool,
        rows: tuple[int, int] | None = None,
    ):
        self._x, self._y = stage.x_NxF, stage.y_NxK
        self._order = order_N
        self._batch_size = batch_size
        self._pad = pad
        # Multi-host: this process reads only rows [lo, hi) of every (sorted, padded) batch.
        self._rows = rows or (0, batch_size)

    def map(self, b: int) -> dict[str, np.ndarray]:
        idx = self._order[b * self._batch_size : (b + 1) * self._batch_size]
        # Sorted reads are sequential on disk; the order of rows inside a batch does not matter.
        lo, hi = self._rows
        idx = np.sort(idx)[lo:hi]  # a short last batch: the padding below fills its end
        x, y = np.asarray(self._x[idx]), np.asarray(self._y[idx])
        w = np.ones(idx.size, np.float32)
        short = (hi - lo) - idx.size
        if self._pad and short > 0:
            x = np.concatenate([x, np.zeros((short, x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.zeros((short, y.shape[1]), y.dtype)])
            w = np.concatenate([w, np.zeros(short, np.float32)])
        return {"x": x, "y": y, "w": w}


class _ToDevice(grain.transforms.Map):
    """numpy batch -> device batch; runs in grain's reader threads, off the dispatch thread.

    With a sharding, the (process-local part of the) batch becomes one global array of
    `batch_size` rows split over the mesh (`diet_jax.parallel`)."""

    def __init__(self, sharding=None, batch_size: int = 0):
        self._sharding = sharding
        self._batch_size = batch_size

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self._sharding is None:
            return jax.device_put(batch)
        return parallel.global_batch(batch, self._sharding, self._batch_size)


def num_batches(rows: int, batch_size: int, drop_remainder: bool) -> int:
    return rows // batch_size if drop_remainder else -(-rows // batch_size)


def padded_batch_size(rows: int, batch_size: int, divisor: int = 1, floor: int = 256) -> int:
    """The largest batch size batch_size / 2^k whose padded pass over `rows` is within 1/16 of
    the least padding any such size gives.

    A pass with `drop_remainder=False` computes whole batches: 10,000 rows at 8,192 a batch are
    16,384 rows of work, at 2,048 they are 10,240. Halving keeps the result a divisor of
    batch_size; it stops at `floor` (smaller batches cost more calls than padding saves) and
    where `divisor` (the devices a batch is split over) would no longer divide it.
    """
    sizes = [batch_size]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= floor and (sizes[-1] // 2) % divisor == 0:
        sizes.append(sizes[-1] // 2)
    work = [num_batches(rows, b, False) * b for b in sizes]
    return next(b for b, w in zip(sizes, work, strict=True) if 16 * w <= 17 * min(work))


def epoch_order(rows: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    if not shuffle:
        return np.arange(rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(rows)


def batch_dataset(
    stage: Stage,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = True,
    rows: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """A grain MapDataset of batches over one stage, for one epoch.

    With `drop_remainder=False` the last batch is padded to `batch_size` with weight-0 rows
    (`w`), so every batch has one static shape and jitted steps compile once. `rows` = (lo, hi):
    only rows lo..hi-1 of every batch (a process's share on several hosts, `parallel.local_rows`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    n = num_batches(len(stage), batch_size, drop_remainder)
    order = epoch_order(len(stage), shuffle=shuffle, seed=seed, epoch=epoch)
    return grain.MapDataset.range(n).map(
        _GatherBatch(stage, order, batch_size, pad=not drop_remainder, rows=rows)
    )


def iterate(ds: grain.MapDataset, *, threads: int = 2, prefetch: int = 4) -> Iterator[dict]:
    """Iterates a batch dataset with background reads (grain threads) in a fixed order."""
    return iter(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    )


def prefetch_to_device(it: Iterator[dict], size: int = 2, sharding=None) -> Iterator[dict]:
    """Keeps `size` batches already transferred to the device while the current step runs."""
    queue: collections.deque = collections.deque()

    def put(batch):
        return jax.device_put(batch, sharding) if sharding is not None else jax.device_put(batch)

    for batch in itertools.islice(it, size):
        queue.append(put(batch))
    for batch in it:
        queue.append(put(batch))
        yield queue.popleft()
    while queue:
        yield queue.popleft()


def device_batches(
    stage: Stage,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = True,
    sharding=None,
    prefetch: int = 4,
) -> Iterator[dict]:
    """The usual composition: a stage's batches, gathered and put on the device by background
    threads, up to `prefetch` batches ahead of the step that consumes them. With a `sharding`
    (`parallel.batch_sharding(mesh)`) each batch is split over the mesh, and on several hosts
    each process reads only its own rows of every batch."""
    rows = parallel.local_rows(sharding, batch_size)
    ds = batch_dataset(
        stage,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_remainder=drop_remainder,
        rows=None if rows == (0, batch_size) else rows,
    )
    return iterate(ds.map(_ToDevice(sharding, batch_size)), prefetch=prefetch)
