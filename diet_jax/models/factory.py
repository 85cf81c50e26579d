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


# ------------------------------------------------------------------ user modules

OUTPUTS = ("representation", "logits")


def _check_output(out, e_BxFxD, output: str, num_tasks: int, what: str) -> None:
    """Raises a ValueError naming the expected and the actual output shape."""
    b = e_BxFxD.shape[0]
    if output == "logits":
        want, ok = f"logits_BxK of shape ({b}, {num_tasks})", False
        if hasattr(out, "shape"):
            ok = tuple(out.shape) == (b, num_tasks)
    else:
        want = f"a representation h_BxH of shape ({b}, H) (or a tuple of them)"
        parts = out if isinstance(out, tuple) else (out,)
        ok = bool(parts) and all(
            hasattr(h, "shape") and h.ndim == 2 and h.shape[0] == b and h.shape[1] > 0
            for h in parts
        )
    if ok:
        return
    if isinstance(out, tuple):
        got = "a tuple of shapes " + ", ".join(str(tuple(getattr(h, "shape", ()))) for h in out)
    elif hasattr(out, "shape"):
        got = f"shape {tuple(out.shape)}"
    else:
        got = f"a {type(out).__name__}"
    raise ValueError(
        f"{what} with output={output!r} must return {want} for e_BxFxD of shape "
        f"{tuple(e_BxFxD.shape)}; it returned {got}."
    )


class CheckedModule(nn.Module):
    """A user's module called as `module(e_BxFxD, train)`, its output shape checked at trace time."""

    module: nn.Module
    output: str = "representation"
    num_tasks: int = 1
    what: str = "module"

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        out = self.module(e_BxFxD, train)
        _check_output(out, e_BxFxD, self.output, self.num_tasks, self.what)
        return out


def from_module(
    module: nn.Module,
    model_cfg,
    feature_map,
    *,
    output: str = "representation",
    name: str | None = None,
) -> RecModel:
    """Wraps a user's flax module as a RecModel on the project's embedding table.

    `module(e_BxFxD, train)` gets the field embeddings (float32) and a train flag. With
    `output="representation"` it returns h_BxH (or a tuple of them, one per block), scored by the
    shared MMoE head of `model_cfg.mmoe`, like every zoo backbone; with `output="logits"` it
    returns per-task logits_BxK itself. The embedding is `model_cfg.embed_dim` wide, as the
    teacher's, so the candidate inherits the teacher's table. A wrong output shape raises a
    ValueError naming the expected and the actual shape, here and whenever the module is traced.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a flax.linen Module, got {type(module).__name__}.")
    name = name or type(module).__name__.lower()
    try:
        hash(module)
    except TypeError as e:
        raise TypeError(
            f"Module {name!r} is not hashable ({e}): give it tuple, not list or dict, attributes; "
            "compiled steps are cached by model."
        ) from None
    # The zoo's embedding and head, exactly as build_model makes them (the backbone is unused).
    zoo = build_model(model_cfg, feature_map, name=BACKBONES[0])
    checked = CheckedModule(module, output, feature_map.num_tasks, f"Module {name!r}")
    dense_net = (
        DenseNet(backbone=checked, head=zoo.dense_net.head)
        if output == "representation"
        else checked
    )
    model = RecModel(name=name, embedding=zoo.embedding, dense_net=dense_net)
    # Fail now rather than inside a jitted step: trace init and both modes on a small batch.
    e = jax.ShapeDtypeStruct((2, model.num_fields, model.embedding.embed_dim), jnp.float32)
    params, state = jax.eval_shape(model.init_dense, jax.random.key(0))
    for train in (False, True):
        jax.eval_shape(lambda p, s, x, t=train: model.dense(p, s, x, train=t), params, state, e)
    return model


def load_module(spec: str, kwargs: dict | None = None) -> nn.Module:
    """`"package.module:Name"` or `"path/to/file.py:Name"` -> a flax module.

    `Name` may be a Module class or a function returning a module (called with `kwargs`), or a
    module instance (then `kwargs` must be empty).
    """
    import importlib
    import importlib.util
    import os
    import sys

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"A module spec looks like 'package.module:Name' or 'file.py:Name', got {spec!r}."
        )
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Module spec {spec!r}: no file {path}.")
        mod_name = f"diet_jax_user_{os.path.splitext(os.path.basename(path))[0]}"
        if mod_name not in sys.modules or getattr(sys.modules[mod_name], "__file__", "") != path:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = mod  # flax and pickle look classes up by module name
            file_spec.loader.exec_module(mod)
        mod = sys.modules[mod_name]
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"Module spec {spec!r}: cannot import {target!r} ({e}).") from None
    if not hasattr(mod, attr):
        raise ValueError(f"Module spec {spec!r}: {target!r} has no attribute {attr!r}.")
    obj = getattr(mod, attr)
    kwargs = dict(kwargs or {})
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ValueError(f"Module spec {spec!r} names an instance; it takes no arguments.")
        return obj
    if not callable(obj):
        raise ValueError(f"Module spec {spec!r} names a {type(obj).__name__}, not a module.")
    module = obj(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    if not isinstance(module, nn.Module):
        raise ValueError(f"Module spec {spec!r} returned a {type(module).__name__}, not a module.")
    return module


@dataclasses.dataclass(frozen=True)
class ProxyInit:
    """theta_0 of a user proxy, shaped like a TrainState where bilevel.stage_context reads it."""

    dense: dict
    model_state: dict

    @property
    def params(self) -> dict:
        return {"dense": self.dense}


def proxy_from_config(config, feature_map) -> RecModel | None:
    """The user proxy of `config.distill.proxy_module`, or None for the teacher's backbone."""
    dc = config.distill
    spec = dc.get("proxy_module", "")
    if not spec:
        return None
    check_proxy_config(dc)
    module = load_module(spec)
    return from_module(
        module, config.model, feature_map, output=dc.get("proxy_output", "representation")
    )


def check_proxy_config(dc) -> None:
    """Validates distill.proxy_module / proxy_output (ValueError naming the key)."""
    output = dc.get("proxy_output", "representation")
    if output not in OUTPUTS:
        raise ValueError(f"config.distill.proxy_output must be one of {OUTPUTS}, got {output!r}.")
    spec = dc.get("proxy_module", "")
    if spec and dc.get("influence_at", "proxy") != "proxy":
        raise ValueError(
            "config.distill.influence_at must be 'proxy' with a config.distill.proxy_module: "
            "the teacher's parameters do not fit another architecture."
        )
    if spec and ":" not in spec:
        raise ValueError(
            f"config.distill.proxy_module must look like 'package.module:Name' or "
            f"'file.py:Name', got {spec!r}."
        )
