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


def make_train_step(model: RecModel, tx: optax.GradientTransformation):
    """(state, batch{x, y, w}) -> (state, {"loss"}): one step on real samples, whole model."""

    def loss_fn(params, model_state, batch):
        logits, new_state, aux = model.apply(params, model_state, batch["x"], train=True)
        loss = weighted_mean(bce_per_sample(logits, batch["y"]), batch["w"])
        return loss + aux, (loss, new_state)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict):
        grads, (loss, new_model_state) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(
            step=state.step + 1, params=params, model_state=new_model_state, opt_state=opt_state
        )
        return new, {"loss": loss}

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


def sparse_grads(model: RecModel, params: dict, model_state: dict, batch: dict):
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
):
    """(state, batch) -> (state, {"loss"}): the whole model, embedding rows updated sparsely.

    `dense_tx` must not clip (`make_optimizer(cfg, clip=False)`): `max_grad_norm` > 0 clips the
    dense and row gradients by their joint norm. The state is donated: the table and its
    optimizer state are scattered into in place, never copied.
    """

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict):
        loss, new_model_state, g_dense, rows_U, g_UxD = sparse_grads(
            model, state.params, state.model_state, batch
        )
        if max_grad_norm and max_grad_norm > 0:
            g_dense, g_UxD = clip_joint_global_norm(g_dense, g_UxD, max_grad_norm)
        updates, dense_opt = dense_tx.update(
            g_dense, state.opt_state["dense"], state.params["dense"]
        )
        table_VxD, embed_opt = row_opt.update(
            _table(state.params), state.opt_state["embed"], rows_U, g_UxD
        )
        new = state.replace(
            step=state.step + 1,
            params={
                **state.params,
                "dense": optax.apply_updates(state.params["dense"], updates),
                "embed": {"table": table_VxD},
            },
            model_state=new_model_state,
            opt_state={"dense": dense_opt, "embed": embed_opt},
        )
        return new, {"loss": loss}

    return train_step


class Trainer(NamedTuple):
    init: Callable  # (params, model_state) -> TrainState
    step: Callable  # jitted, donating (state, batch) -> (state, {"loss"})


def make_trainer(model: RecModel, train_cfg) -> Trainer:
    """The state constructor and train step that `train_cfg.embedding_optimizer` asks for.

    "dense_adam": `make_optimizer(train_cfg)` over the whole tree (`make_train_step`).
    "lazy_adam" / "rowwise_adagrad": row-sparse table updates, the dense network with
    `make_optimizer(train_cfg, clip=False)`, clipping by the joint global norm.
    """
    name = train_cfg.get("embedding_optimizer", "dense_adam")
    if name == "dense_adam":
        tx = make_optimizer(train_cfg)
        return Trainer(functools.partial(create_train_state, tx=tx), make_train_step(model, tx))
    if name not in sparse.EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"Unsupported embedding_optimizer: {name!r}; "
            f"available: {', '.join(sparse.EMBEDDING_OPTIMIZERS)}."
        )
    row_opt = sparse.make_row_optimizer(train_cfg)
    dense_tx = make_optimizer(train_cfg, clip=False)
    return Trainer(
        functools.partial(create_sparse_train_state, dense_tx=dense_tx, row_opt=row_opt),
        make_sparse_train_step(model, dense_tx, row_opt, train_cfg.max_grad_norm),
    )


def make_predict_step(model: RecModel):
    """(params, model_state, x_BxF) -> logits_BxK in eval mode."""

    @jax.jit
    def predict_step(params, model_state, x_BxF):
        return model.apply(params, model_state, x_BxF, train=False)[0]

    return predict_step
