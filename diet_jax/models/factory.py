"""A recommender split in two pure functions, and the factory that builds it by name.

    embed(params["embed"], x_BxF)                        -> e_BxFxD
    dense(params["dense"], state, e_BxFxD, train)        -> logits_BxK, new_state, aux_loss

Distilled samples live in embedding space, so any dense network trains on them; a candidate
inherits the teacher's `params["embed"]` unchanged. `state` holds non-trainable collections
(BatchNorm's `batch_stats`); it is an empty dict for models without them. A backbone may add
auxiliary training losses (FinalNet's self-distillation) by `self.sow("losses", name, value)`;
`dense` returns their sum in train mode.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diet_jax.models.dcn import DCN
from diet_jax.models.embedding import FieldEmbedding
from diet_jax.models.mmoe import MMoEHead

BACKBONES = ("dcn",)


class DenseNet(nn.Module):
    """Backbone representation -> shared MMoE head -> K logits."""

    backbone: nn.Module
    head: MMoEHead

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        return self.head(self.backbone(e_BxFxD, train), train)


@dataclasses.dataclass(frozen=True)
class RecModel:
    name: str
    embedding: FieldEmbedding
    dense_net: DenseNet

    @property
    def num_fields(self) -> int:
        return len(self.embedding.vocab_sizes)

    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        """Returns (params {"embed", "dense"}, state)."""
        k_emb, k_dense = jax.random.split(rng)
        x = jnp.zeros((2, self.num_fields), jnp.int32)
        params_embed = self.embedding.init(k_emb, x)["params"]
        variables = self.dense_net.init(k_dense, self.embed(params_embed, x), train=False)
        state = {k: v for k, v in variables.items() if k != "params"}
        return {"embed": params_embed, "dense": variables["params"]}, state

    def init_dense(self, rng: jax.Array) -> tuple[dict, dict]:
        """Fresh dense parameters and state only (a proxy or a candidate on inherited embeddings)."""
        e = jnp.zeros((2, self.num_fields, self.embedding.embed_dim), jnp.float32)
        variables = self.dense_net.init(rng, e, train=False)
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def embed(self, params_embed: dict, x_BxF: jax.Array) -> jax.Array:
        return self.embedding.apply({"params": params_embed}, x_BxF)

    def dense(self, params_dense: dict, state: dict, e_BxFxD: jax.Array, train: bool = False):
        variables = {"params": params_dense, **state}
        if not train:
            return (
                self.dense_net.apply(variables, e_BxFxD, train=False),
                state,
                jnp.zeros((), jnp.float32),
            )
        logits, mutated = self.dense_net.apply(
            variables, e_BxFxD, train=True, mutable=[*state.keys(), "losses"]
        )
        mutated = dict(mutated)
        aux = sum(
            (jnp.sum(v) for v in jax.tree.leaves(mutated.pop("losses", {}))),
            jnp.zeros((), jnp.float32),
        )
        return logits, mutated, aux

    def apply(self, params: dict, state: dict, x_BxF: jax.Array, train: bool = False):
        return self.dense(params["dense"], state, self.embed(params["embed"], x_BxF), train)


def build_backbone(name: str, model_cfg) -> nn.Module:
    """The backbone called `name`, with its hyperparameters from `model_cfg.<name>`."""
    if name == "dcn":
        c = model_cfg.dcn
        return DCN(num_cross_layers=c.num_cross_layers, hidden=tuple(c.hidden), use_bn=c.use_bn)
    raise ValueError(f"Unsupported backbone: {name!r}; available: {', '.join(BACKBONES)}.")


def build_model(model_cfg, feature_map, name: str | None = None) -> RecModel:
    """Embedding + backbone `name` (default `model_cfg.name`) + the shared MMoE head."""
    name = name or model_cfg.name
    h = model_cfg.mmoe
    head = MMoEHead(
        num_tasks=feature_map.num_tasks,
        num_experts=h.num_experts,
        expert_hidden=tuple(h.expert_hidden),
        gate_hidden=tuple(h.gate_hidden),
        tower_hidden=tuple(h.tower_hidden),
    )
    return RecModel(
        name=name,
        embedding=FieldEmbedding(
            vocab_sizes=tuple(feature_map.vocab_sizes), embed_dim=model_cfg.embed_dim
        ),
        dense_net=DenseNet(backbone=build_backbone(name, model_cfg), head=head),
    )
