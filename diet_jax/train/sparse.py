"""Row-sparse embedding updates: gradients and optimizer steps for the rows a batch touches.

A batch of B samples over F fields reads at most N = B*F rows of a V x D table, with V in the
hundreds of thousands to millions. Dense Adam reads and writes all V rows (table and two moments)
every step; here the batch's row ids are reduced to their unique set (a static size N, padded
with out-of-range ids so the step jits once), the gradient of the gathered embeddings is
segment-summed per unique row, and only those rows of the table and of the optimizer state are
read and written back. With the train state donated the scatters update the buffers in place.

Row optimizers are pairs of pure functions, like optax's `GradientTransformation`:

    state = opt.init(table_VxD)
    table_VxD, state = opt.update(table_VxD, state, rows_U, g_UxD)

`rows_U` may hold padding ids >= V; their gradient must be zero, and the scatters drop them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

EMBEDDING_OPTIMIZERS = ("dense_adam", "lazy_adam", "rowwise_adagrad")


class RowOptimizer(NamedTuple):
    init: Callable
    update: Callable


def unique_rows(rows_N: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(rows_U, inverse_N): the sorted unique row ids padded to U = N with out-of-range ids
    (num_rows + position), and for every input position the index of its row in rows_U
    (so rows_U[inverse_N] == rows_N).

    The padding ids are distinct too, so every scatter may promise unique indices.
    """
    if rows_N.ndim != 1:
        raise ValueError(f"unique_rows expects a flat vector of row ids, got shape {rows_N.shape}.")
    n = rows_N.shape[0]
    rows_U, inverse_N = jnp.unique(rows_N, size=n, fill_value=num_rows, return_inverse=True)
    rows_U = jnp.where(rows_U >= num_rows, num_rows + jnp.arange(n, dtype=rows_U.dtype), rows_U)
    return rows_U, inverse_N.reshape(-1)


def segment_row_grads(g_NxD: jax.Array, inverse_N: jax.Array) -> jax.Array:
    """g_UxD: the gradient of every unique row, summed over the positions that read it.

    Padding segments (the out-of-range ids of `unique_rows`) receive no position, hence zero.
    """
    return jax.ops.segment_sum(g_NxD, inverse_N, num_segments=g_NxD.shape[0])


def gather_rows(a_Vx: jax.Array, rows_U: jax.Array) -> jax.Array:
    """a[rows_U] with zeros for the padding ids (out of range)."""
    return jnp.take(a_Vx, rows_U, axis=0, mode="fill", fill_value=0)


def scatter_rows(a_Vx: jax.Array, rows_U: jax.Array, values_U: jax.Array) -> jax.Array:
    """a with rows_U set to values_U; padding ids are dropped. In place when `a` is donated."""
    return a_Vx.at[rows_U].set(values_U, mode="drop", unique_indices=True)


def sparse_table_grad(num_rows: int, rows_U: jax.Array, g_UxD: jax.Array) -> jax.Array:
    """The dense V x D gradient that (rows_U, g_UxD) stands for. For tests and checks only."""
    return jnp.zeros((num_rows, g_UxD.shape[1]), g_UxD.dtype).at[rows_U].add(g_UxD, mode="drop")


# ---------------------------------------------------------------------------- lazy Adam
class LazyAdamState(NamedTuple):
    count: jax.Array  # steps taken; bias correction uses it, as optax.adam does
    mu: jax.Array  # V x D first moment
    nu: jax.Array  # V x D second moment


def lazy_adam(
    learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> RowOptimizer:
    """Adam whose moments move only on the rows a step touches (TF's LazyAdam).

    Bias correction uses the global step count, so when every row is touched at every step this
    is exactly optax.adam. Rows not touched keep their moments instead of decaying them.
    """

    def init(table_VxD):
        return LazyAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jnp.zeros_like(table_VxD),
            nu=jnp.zeros_like(table_VxD),
        )

    def update(table_VxD, state, rows_U, g_UxD):
        count = state.count + 1
        mu_UxD = b1 * gather_rows(state.mu, rows_U) + (1.0 - b1) * g_UxD
        nu_UxD = b2 * gather_rows(state.nu, rows_U) + (1.0 - b2) * jnp.square(g_UxD)
        t = count.astype(g_UxD.dtype)
        mu_hat = mu_UxD / (1.0 - b1**t)
        nu_hat = nu_UxD / (1.0 - b2**t)
        w_UxD = gather_rows(table_VxD, rows_U) - learning_rate * mu_hat / (jnp.sqrt(nu_hat) + eps)
        return scatter_rows(table_VxD, rows_U, w_UxD), LazyAdamState(
            count=count,
            mu=scatter_rows(state.mu, rows_U, mu_UxD),
            nu=scatter_rows(state.nu, rows_U, nu_UxD),
        )

    return RowOptimizer(init, update)


# ---------------------------------------------------------------------------- row-wise Adagrad
class RowwiseAdagradState(NamedTuple):
    acc: jax.Array  # V accumulated mean squared gradient, one scalar per row


def rowwise_adagrad(
    learning_rate: float, eps: float = 1e-8, initial_accumulator: float = 0.0
) -> RowOptimizer:
    """Adagrad with one accumulator per row (the mean over D of the squared gradient), as in
    DLRM / FBGEMM: the state is V floats instead of Adam's 2 x V x D."""

    def init(table_VxD):
        return RowwiseAdagradState(
            acc=jnp.full(table_VxD.shape[:1], initial_accumulator, table_VxD.dtype)
        )

    def update(table_VxD, state, rows_U, g_UxD):
        acc_U = gather_rows(state.acc, rows_U) + jnp.mean(jnp.square(g_UxD), axis=-1)
        step_UxD = learning_rate * g_UxD / (jnp.sqrt(acc_U)[:, None] + eps)
        w_UxD = gather_rows(table_VxD, rows_U) - step_UxD
        return scatter_rows(table_VxD, rows_U, w_UxD), RowwiseAdagradState(
            acc=scatter_rows(state.acc, rows_U, acc_U)
        )

    return RowOptimizer(init, update)


def make_row_optimizer(train_cfg) -> RowOptimizer:
    """The row-sparse optimizer named by `train_cfg.embedding_optimizer`."""
    name = train_cfg.embedding_optimizer
    lr = train_cfg.adagrad_learning_rate if name == "rowwise_adagrad" else train_cfg.learning_rate
    if not lr > 0:
        raise ValueError(f"{name} needs a positive learning rate, got {lr}.")
    if name == "lazy_adam":
        return lazy_adam(lr)
    if name == "rowwise_adagrad":
        return rowwise_adagrad(lr)
    raise ValueError(
        f"Unsupported sparse embedding optimizer: {name!r}; available: lazy_adam, rowwise_adagrad "
        "(dense_adam is the dense optax path)."
    )
