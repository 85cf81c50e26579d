"""A recommender split in two pure functions, and the factory that builds it by name.

    embed(params["embed"], x_BxF)                        -> e_BxFxD
    dense(params["dense"], state, e_BxFxD, train)        -> logits_BxK, new_state, aux_loss

Distilled samples live in embedding space, so any dense network trains on them; a candidate
inherits the teacher's `params["embed"]` unchanged. `state` holds non-trainable collections
(BatchNorm's `batch_stats`); it is an empty dict for models without them. Auxiliary training
losses are sown with `self.sow("losses", name, value)` (FinalNet 2B's self-distillation, by
`DenseNet`); `dense` returns their sum in train mode.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diet_jax.models.dcn import DCN
from diet_jax.models.dcnv2 import DCNv2
from diet_jax.models.embedding import FieldEmbedding
from diet_jax.models.finalmlp import FinalMLP
from diet_jax.models.finalnet import FinalNet
from diet_jax.models.mmoe import MMoEHead
from diet_jax.models.wukong import WuKong

BACKBONES = ("dcn", "dcnv2", "finalnet", "finalmlp", "wukong")


class DenseNet(nn.Module):
    """Backbone representation -> shared MMoE head -> K logits.

    A backbone with several blocks (FinalNet 2B) returns a tuple of block representations: the one
    head scores each block, the logits are their mean, and in train mode every block's logits are
    self-distilled towards the mean, sum_b mean_B sum_k BCE(l_b, sg(sigmoid(mean))), as FinalNet
    does with its per-block logit layers (models/finalnet.py explains the choice).
    """

    backbone: nn.Module
    head: MMoEHead

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        h = self.backbone(e_BxFxD, train)
        if not isinstance(h, tuple):
            return self.head(h, train)
        block_logits = [self.head(h_b, train) for h_b in h]
        logits_BxK = sum(block_logits) / len(block_logits)
        if train:
            target_BxK = jax.lax.stop_gradient(jax.nn.sigmoid(logits_BxK))
            for i, l_BxK in enumerate(block_logits):
                bce_BxK = optax.sigmoid_binary_cross_entropy(l_BxK, target_BxK)
                self.sow("losses", f"self_distill_{i}", jnp.mean(jnp.sum(bce_BxK, axis=-1)))
        return logits_BxK


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
    if name == "dcnv2":
        c = model_cfg.dcnv2
        return DCNv2(
            structure=c.structure,
            num_cross_layers=c.num_cross_layers,
            low_rank_mixture=c.low_rank_mixture,
            low_rank=c.low_rank,
            num_experts=c.num_experts,
            stacked_hidden=tuple(c.stacked_hidden),
            parallel_hidden=tuple(c.parallel_hidden),
            use_bn=c.use_bn,
        )
    if name == "finalnet":
        c = model_cfg.finalnet
        return FinalNet(
            block_type=c.block_type,
            use_bn=c.use_bn,
            feature_gating=c.feature_gating,
            block1_hidden=tuple(c.block1_hidden),
            block2_hidden=tuple(c.block2_hidden),
            act=c.act,
            residual_type=c.residual_type,
        )
    if name == "finalmlp":
        c = model_cfg.finalmlp
        return FinalMLP(
            mlp1_hidden=tuple(c.mlp1_hidden),
            mlp2_hidden=tuple(c.mlp2_hidden),
            use_bn=c.use_bn,
            use_fs=c.use_fs,
            fs_hidden=tuple(c.fs_hidden),
            fs1_context=tuple(c.fs1_context),
            fs2_context=tuple(c.fs2_context),
            num_heads=c.num_heads,
            fusion_dim=c.fusion_dim,
        )
    if name == "wukong":
        c = model_cfg.wukong
        return WuKong(
            num_layers=c.num_layers,
            lcb_features=c.lcb_features,
            fmb_features=c.fmb_features,
            rank_k=c.rank_k,
            fmb_hidden=tuple(c.fmb_hidden),
            top_hidden=tuple(c.top_hidden),
            top_bn=c.top_bn,
            layer_norm=c.layer_norm,
        )
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
