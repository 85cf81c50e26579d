"""Pure, jitted train and eval steps over pytrees.

Steps are built once per (model, optimizer) by the `make_*` factories and keep no Python state;
the train state is donated so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import optax

from diet_jax.models.factory import RecModel


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


def make_predict_step(model: RecModel):
    """(params, model_state, x_BxF) -> logits_BxK in eval mode."""

    @jax.jit
    def predict_step(params, model_state, x_BxF):
        return model.apply(params, model_state, x_BxF, train=False)[0]

    return predict_step
