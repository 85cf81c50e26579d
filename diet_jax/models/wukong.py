"""WuKong (Zhang et al., 2024): stacked Factorization Machine and Linear Compress Blocks.

A layer maps X (B, n, D) to (B, n_fmb + n_lcb, D):
    FMB: FM = X (X^T Y), Y in R^{n x k} (rank-k projection, N(0, 1) init; k = 0 gives X X^T),
         flat -> LayerNorm -> MLP (ReLU) -> Linear(n_fmb D) -> ReLU -> (B, n_fmb, D)
    LCB: Linear over the feature axis, n -> n_lcb, no bias
    out = LayerNorm_D([FMB ; LCB] + res),  res = X, or a Linear n -> n_out over the feature axis
          when the number of features changes.
The representation handed to the MMoE head is the top MLP's last hidden layer (ReLU, BatchNorm)
on flat(out): FuxiCTR's top MLP_Block without its final Linear to one logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diet_jax.models.layers import LN_EPSILON, MLP, dense, layer_norm


class LayerNormAxis(nn.Module):
    """LayerNorm over the last axis, flax's nn.LayerNorm formulas (fast variance, eps 1e-5).

    The reciprocal standard deviation multiplies at the reduced shape, not folded into the scale
    first: flax's rsqrt * scale is a full-size array that XLA materializes in the backward pass.
    """

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
        return (x - mean) * jax.lax.rsqrt(var + LN_EPSILON) * scale + bias


class FactorizationMachineBlock(nn.Module):
    num_features: int
    rank_k: int = 8
    hidden: Sequence[int] = (512, 256)

    @nn.compact
    def __call__(self, x_BxNxD):
        b, n, d = x_BxNxD.shape
        if self.rank_k > 0:
            y_NxK = self.param("proj_y", nn.initializers.normal(1.0), (n, self.rank_k))
            fm_BxNxK = jnp.einsum(
                "bnd,bdk->bnk", x_BxNxD, jnp.einsum("bnd,nk->bdk", x_BxNxD, y_NxK)
            )
        else:
            fm_BxNxK = jnp.einsum("bnd,bmd->bnm", x_BxNxD, x_BxNxD)
        z = layer_norm(name="ln")(fm_BxNxK.reshape(b, -1))
        z = MLP(self.hidden, output_dim=self.num_features * d, name="mlp")(z)
        return nn.relu(z).reshape(b, self.num_features, d)


class WuKongLayer(nn.Module):
    lcb_features: int = 40
    fmb_features: int = 40
    rank_k: int = 8
    fmb_hidden: Sequence[int] = (512, 256)
    layer_norm: bool = True

    @nn.compact
    def __call__(self, x_BxNxD):
        n_out = self.lcb_features + self.fmb_features
        fmb = FactorizationMachineBlock(self.fmb_features, self.rank_k, self.fmb_hidden, name="fmb")
        x_BxDxN = jnp.swapaxes(x_BxNxD, 1, 2)
        lcb_BxDxL = dense(self.lcb_features, use_bias=False, name="lcb")(x_BxDxN)
        out = jnp.concatenate([fmb(x_BxNxD), jnp.swapaxes(lcb_BxDxL, 1, 2)], axis=1)
        if x_BxNxD.shape[1] == n_out:
            out = out + x_BxNxD
        else:
            out = out + jnp.swapaxes(dense(n_out, name="residual")(x_BxDxN), 1, 2)
        return LayerNormAxis(name="ln")(out) if self.layer_norm else out


class WuKong(nn.Module):
    num_layers: int = 3
    lcb_features: int = 40
    fmb_features: int = 40
    rank_k: int = 8
    fmb_hidden: Sequence[int] = (512, 256)
    top_hidden: Sequence[int] = (512, 256)
    top_bn: bool = True
    layer_norm: bool = True

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        if not self.top_hidden:
            raise ValueError(
                "WuKong needs at least one top_hidden layer: it is the representation."
            )
        x = e_BxFxD
        for i in range(self.num_layers):
            x = WuKongLayer(
                self.lcb_features,
                self.fmb_features,
                self.rank_k,
                self.fmb_hidden,
                self.layer_norm,
                name=f"layer_{i}",
            )(x)
        return MLP(self.top_hidden, use_bn=self.top_bn, name="top")(
            x.reshape(x.shape[0], -1), train
        )
