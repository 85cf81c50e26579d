"""Pure, jitted train and eval steps over pytrees.

Steps are built once per (model, optimizer) by the `make_*` factories and keep no Python state;
the train state is donated so parameters and optimizer moments are updated in place.

Two ways to train the whole model, chosen by `train.embedding_optimizer` in `make_trainer`:
"dense_adam" differentiates the full parameter tree and lets optax update every row of the
embedding table; "lazy_adam" and "rowwise_adagrad" take the gradient of the gathered embeddings
from the dense network's backward pass, segment-sum it over the batch's unique rows and update
only those rows (`train/sparse.py`), while the dense network keeps its optax optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from diet_jax.models.embedding import field_offsets
from diet_jax.models.factory import RecModel
from diet_jax.train import sparse
from diet_jax.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    model_state: dict
    opt_state: optax.OptState


def create_train_state(
    params: dict, model_state: dict, tx: optax.GradientTransformation
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
    )


def bce_per_sample(logits_BxK: jax.Array, y_BxK: jax.Array) -> jax.Array:
    """Sum over tasks of binary cross-entropy, one value per sample (targets may be soft)."""
    return jnp.sum(
        optax.sigmoid_binary_cross_entropy(logits_BxK, y_BxK.astype(logits_BxK.dtype)), axis=-1
    )


def weighted_mean(v_B: jax.Array, w_B: jax.Array) -> jax.Array:
    return jnp.sum(v_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)


NAN_POLICIES = ("stop", "skip_batch")


NAN_PHASES = ("teacher", "candidate", "distill")


def check_nan_policy(train_cfg) -> None:
    """Rejects a bad `train.nan_policy` or `train.inject_nan` (ValueError naming the key)."""
    policy = train_cfg.get("nan_policy", "stop")
    if policy not in NAN_POLICIES:
        raise ValueError(f"config.train.nan_policy must be one of {NAN_POLICIES}, got {policy!r}.")
    inject_nan_step(train_cfg, "teacher")


def inject_nan_step(train_cfg, phase: str) -> int:
    """The step at which `phase` gets a NaN loss, from the test switch `train.inject_nan`
    ("teacher:17", "candidate:3", "distill:2"; "" = off), or -1.

    teacher: the train state's step, counted over all stages; candidate: the fine-tune's step;
    distill: the outer iteration, in every stage.
    """
    spec = train_cfg.get("inject_nan", "")
    if not spec:
        return -1
    name, _, step = str(spec).partition(":")
    if name not in NAN_PHASES or not step.isdigit():
        raise ValueError(
            f"config.train.inject_nan must be '<phase>:<step>' with phase in {NAN_PHASES}, "
            f"got {spec!r}."
        )
    return int(step) if name == phase else -1


def _poison(step: jax.Array, inject_nan_step: int) -> jax.Array:
    """1.0, or NaN at the step a test asked for (`train.inject_nan`): loss and gradients
    both become NaN there, as from a poisoned batch."""
    if inject_nan_step < 0:
        return jnp.ones((), jnp.float32)
    return jnp.where(step == inject_nan_step, jnp.nan, 1.0).astype(jnp.float32)


def _finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def _guard_metrics(loss, grad_norm, finite, nan_policy: str) -> dict:
    """The step's metrics; "skipped" is present only under skip_batch (the loop reads it so)."""
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    if nan_policy == "skip_batch":
        out["skipped"] = ~finite
    return out


def make_train_step(
    model: RecModel,
    tx: optax.GradientTransformation,
    nan_policy: str = "stop",
    inject_nan_step: int = -1,
):
    """(state, batch{x, y, w}) -> (state, {"loss", "grad_norm", "finite"}): one step on real
    samples, whole model.

    `finite` flags a NaN/Inf loss or gradient norm, computed in the step (no host round trip);
    the loop reads it at its logging interval. `nan_policy="skip_batch"`: such a step leaves
    the state unchanged (but counts the step).
    """

    def loss_fn(params, model_state, batch, poison):
        logits, new_state, aux = model.apply(params, model_state, batch["x"], train=True)
        loss = weighted_mean(bce_per_sample(logits, batch["y"]), batch["w"]) * poison
        return loss + aux, (loss, new_state)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict):
        poison = _poison(state.step, inject_nan_step)
        grads, (loss, new_model_state) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, poison
        )
        grad_norm = optax.tree.norm(grads)
        finite = _finite(loss, grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(
            step=state.step + 1, params=params, model_state=new_model_state, opt_state=opt_state
        )
        if nan_policy == "skip_batch":
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
            new = new.replace(step=state.step + 1)
        return new, _guard_metrics(loss, grad_norm, finite, nan_policy)

    return train_step


# ---------------------------------------------------------------------------- sparse embedding path
def create_sparse_train_state(
    params: dict,
    model_state: dict,
    dense_tx: optax.GradientTransformation,
    row_opt: sparse.RowOptimizer,
) -> TrainState:
    """A TrainState whose opt_state is {"dense": optax state, "embed": row-optimizer state}."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state={
            "dense": dense_tx.init(params["dense"]),
            "embed": row_opt.init(_table(params)),
        },
    )


def _table(params: dict) -> jax.Array:
    embed = params["embed"]
    if set(embed) != {"table"}:
        raise ValueError(
            f"Sparse embedding updates need one embedding table, got leaves {sorted(embed)}."
        )
    return embed["table"]


def sparse_grads(
    model: RecModel, params: dict, model_state: dict, batch: dict, poison: jax.Array | None = None
):
    """Loss and gradients with the embedding gradient kept row-sparse.

    Returns (loss, new_model_state, g_dense, rows_U, g_UxD): the dense subtree's gradient, the
    batch's unique table rows (padded to U = B*F with ids >= V, see `sparse.unique_rows`) and the
    gradient of each of those rows, summed over the positions that read it. No V x D array is
    formed; the gradient of e_BxFxD comes from the backward pass of the dense part alone.
    """
    x_BxF = batch["x"]
    table_VxD = _table(params)
    num_rows = int(sum(model.embedding.vocab_sizes))
    rows_N = (x_BxF + jnp.asarray(field_offsets(model.embedding.vocab_sizes))).reshape(-1)
    rows_U, inverse_N = sparse.unique_rows(rows_N, num_rows)

    def dense_loss(params_dense, e_BxFxD):
        logits, new_state, aux = model.dense(params_dense, model_state, e_BxFxD, train=True)
        loss = weighted_mean(bce_per_sample(logits, batch["y"]), batch["w"])
        if poison is not None:
            loss = loss * poison
        return loss + aux, (loss, new_state)

    e_BxFxD = model.embed(params["embed"], x_BxF)
    (g_dense, g_e_BxFxD), (loss, new_model_state) = jax.grad(
        dense_loss, argnums=(0, 1), has_aux=True
    )(params["dense"], e_BxFxD)
    g_UxD = sparse.segment_row_grads(g_e_BxFxD.reshape(-1, table_VxD.shape[1]), inverse_N)
    return loss, new_model_state, g_dense, rows_U, g_UxD


def clip_joint_global_norm(g_dense, g_UxD: jax.Array, max_norm: float):
    """optax.clip_by_global_norm over the dense gradient and the row gradients together.

    The row gradients hold every nonzero of the V x D table gradient once, so the norm equals the
    dense path's norm and clipping matches it exactly.
    """
    norm = jnp.sqrt(jnp.square(optax.tree.norm(g_dense)) + jnp.sum(jnp.square(g_UxD)))
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), g_dense), g_UxD * scale


def make_sparse_train_step(
    model: RecModel,
    dense_tx: optax.GradientTransformation,
    row_opt: sparse.RowOptimizer,
    max_grad_norm: float = 0.0,
    nan_policy: str = "stop",
    inject_nan_step: int = -1,
):
    """(state, batch) -> (state, {"loss", "grad_norm", "finite"}): the whole model, embedding
    rows updated sparsely.

    `dense_tx` must not clip (`make_optimizer(cfg, clip=False)`): `max_grad_norm` > 0 clips the
    dense and row gradients by their joint norm. The state is donated: the table and its
    optimizer state are scattered into in place, never copied. `nan_policy="skip_batch"`: a
    step with a non-finite loss or gradient norm changes nothing, at no O(V) cost: its rows
    are sent out of range (the scatter drops them) and only the dense and scalar leaves are
    selected.
    """
    num_rows = int(sum(model.embedding.vocab_sizes))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict):
        poison = _poison(state.step, inject_nan_step)
        loss, new_model_state, g_dense, rows_U, g_UxD = sparse_grads(
            model, state.params, state.model_state, batch, poison
        )
        grad_norm = jnp.sqrt(jnp.square(optax.tree.norm(g_dense)) + jnp.sum(jnp.square(g_UxD)))
        finite = _finite(loss, grad_norm)
        if nan_policy == "skip_batch":
            # Out of range (and still distinct, as the scatters promise): no row is touched.
            rows_U = jnp.where(finite, rows_U, rows_U + num_rows)
            g_UxD = jnp.where(finite, g_UxD, 0.0)
        if max_grad_norm and max_grad_norm > 0:
            g_dense, g_UxD = clip_joint_global_norm(g_dense, g_UxD, max_grad_norm)
        updates, dense_opt = dense_tx.update(
            g_dense, state.opt_state["dense"], state.params["dense"]
        )
        table_VxD, embed_opt = row_opt.update(
            _table(state.params), state.opt_state["embed"], rows_U, g_UxD
        )
        dense = optax.apply_updates(state.params["dense"], updates)
        if nan_policy == "skip_batch":
            keep = lambda a, b: jnp.where(finite, a, b)  # noqa: E731
            dense = jax.tree.map(keep, dense, state.params["dense"])
            dense_opt = jax.tree.map(keep, dense_opt, state.opt_state["dense"])
            new_model_state = jax.tree.map(keep, new_model_state, state.model_state)
            embed_opt = jax.tree.map(  # scalars (a step count); the V-sized leaves are untouched
                lambda a, b: keep(a, b) if a.ndim == 0 else a, embed_opt, state.opt_state["embed"]
            )
        new = state.replace(
            step=state.step + 1,
            params={**state.params, "dense": dense, "embed": {"table": table_VxD}},
            model_state=new_model_state,
            opt_state={"dense": dense_opt, "embed": embed_opt},
        )
        return new, _guard_metrics(loss, grad_norm, finite, nan_policy)

    return train_step


class Trainer(NamedTuple):
    init: Callable  # (params, model_state) -> TrainState
    step: Callable  # jitted, donating (state, batch) -> (state, {"loss", "grad_norm", "finite"})


def make_trainer(
    model: RecModel, train_cfg, phase: str = "candidate", runtime_lr: bool = False
) -> Trainer:
    """The state constructor and train step that `train_cfg.embedding_optimizer` asks for.

    "dense_adam": `make_optimizer(train_cfg)` over the whole tree (`make_train_step`).
    `train.nan_policy` and the test switch `train.inject_nan` (for `phase`) reach both steps.
    "lazy_adam" / "rowwise_adagrad": row-sparse table updates, the dense network with
    `make_optimizer(train_cfg, clip=False)`, clipping by the joint global norm.
    `runtime_lr`: the dense optimizer's rate lives in its state (`optim.set_learning_rate`),
    so one compiled step trains at any rate.
    """
    name = train_cfg.get("embedding_optimizer", "dense_adam")
    check_nan_policy(train_cfg)
    guard = {
        "nan_policy": train_cfg.get("nan_policy", "stop"),
        "inject_nan_step": inject_nan_step(train_cfg, phase),
    }
    if name == "dense_adam":
        tx = make_optimizer(train_cfg, runtime_lr=runtime_lr)
        return Trainer(
            functools.partial(create_train_state, tx=tx), make_train_step(model, tx, **guard)
        )
    if name not in sparse.EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"Unsupported embedding_optimizer: {name!r}; "
            f"available: {', '.join(sparse.EMBEDDING_OPTIMIZERS)}."
        )
    row_opt = sparse.make_row_optimizer(train_cfg)
    dense_tx = make_optimizer(train_cfg, clip=False, runtime_lr=runtime_lr)
    return Trainer(
        functools.partial(create_sparse_train_state, dense_tx=dense_tx, row_opt=row_opt),
        make_sparse_train_step(model, dense_tx, row_opt, train_cfg.max_grad_norm, **guard),
    )


def make_predict_step(model: RecModel):
    """(params, model_state, x_BxF) -> logits_BxK in eval mode."""

    @jax.jit
    def predict_step(params, model_state, x_BxF):
        return model.apply(params, model_state, x_BxF, train=False)[0]

    return predict_step


def make_batch_stats_step(model: RecModel, momentum: float):
    """(params, model_state, x_BxF) -> this batch's own BatchNorm statistics (mean, var of every
    BatchNorm layer, in model_state's layout).

    A train-mode pass normalizes with the batch's statistics, never the running ones, and
    updates each running average as r' = m r + (1 - m) b: from r = 0, b = r' / (1 - m).
    `momentum` is the models' BatchNorm momentum (models/layers.BN_MOMENTUM)."""

    @jax.jit
    def batch_stats_step(params, model_state, x_BxF):
        zero = jax.tree.map(jnp.zeros_like, model_state)
        new_state = model.apply(params, zero, x_BxF, train=True)[1]
        return jax.tree.map(lambda r: r / (1.0 - momentum), new_state)

    return batch_stats_step
