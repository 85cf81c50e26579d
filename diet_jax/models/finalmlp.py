"""FinalMLP (Mao et al., 2023): two MLP streams with feature-selection gates and bilinear fusion.

    e = flat(E);  gate_i = 2 sigmoid(MLP_i(ctx_i));  x = MLP1(e * gate_1);  y = MLP2(e * gate_2)
    out_o = w_x,o . x + w_y,o . y + b_o + sum_{h=1}^{H} x_h^T W_{h,o} y_h
with x_h, y_h the h-th of H equal slices of x and y. ctx_i is the flat embedding of the fields
listed in `fs{i}_context` or, with no context (the reference default), a learned vector
initialised to 0. FuxiCTR embeds the context fields with a separate table; the dense network here
only sees e_BxFxD, so context fields are read from e (the shared table).

Multi-task head (decision): the fusion layer is FinalMLP's logit layer; with output size
`fusion_dim` instead of 1 its output is the representation handed to the shared MMoE head, so the
bilinear fusion stays in the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diet_jax.models.layers import MLP, dense


class FeatureSelection(nn.Module):
    """e_BxFxD -> e * 2 sigmoid(MLP(ctx)), flat (B, F D); one gate network per stream."""

    hidden: Sequence[int]
    context: Sequence[int] = ()

    @nn.compact
    def __call__(self, e_BxFxD):
        b, f, d = e_BxFxD.shape
        flat_BxFD = e_BxFxD.reshape(b, -1)
        gate = MLP(self.hidden, output_dim=f * d, name="gate")
        if self.context:
            bad = [i for i in self.context if not 0 <= i < f]
            if bad:
                raise ValueError(f"FinalMLP context fields {bad} out of range for {f} fields.")
            ctx_BxC = e_BxFxD[:, jnp.asarray(self.context)].reshape(b, -1)
            return flat_BxFD * (2.0 * nn.sigmoid(gate(ctx_BxC)))
        # Without context the gate is the same for every sample: compute it once (FuxiCTR repeats
        # the bias over the batch; same values and gradients, B times fewer FLOPs).
        ctx_1xD = self.param("ctx_bias", nn.initializers.zeros, (1, d))
        return flat_BxFD * (2.0 * nn.sigmoid(gate(ctx_1xD)))


def _bilinear_init(key, shape, dtype=jnp.float32):
    """torch xavier_normal_ on FuxiCTR's w_xy, a (H * dx/H * dy/H, out) matrix."""
    h, hx, out, hy = shape
    return (2.0 / (h * hx * hy + out)) ** 0.5 * jax.random.normal(key, shape, dtype)


class InteractionAggregation(nn.Module):
    """Multi-head bilinear fusion of x_BxX and y_BxY into `features` outputs.

    Per head, t = x_h W_h is one matrix product with W_h viewed as (X/H, O * Y/H), and
    out_o += sum_y t[o, y] y_h[y] a fused multiply-reduce: the same sums as the einsum
    "bhx,hxoy,bhy->bo", without the head-major transposes of the activations that a batched
    contraction over heads makes XLA insert.
    """

    features: int
    num_heads: int = 2

    @nn.compact
    def __call__(self, x_BxX, y_BxY):
        dx = x_BxX.shape[-1]
        dy = y_BxY.shape[-1]
        h, o = self.num_heads, self.features
        if dx % h or dy % h:
            raise ValueError(f"FinalMLP stream widths {dx}, {dy} must be divisible by {h} heads.")
        out = dense(o, name="w_x")(x_BxX) + dense(o, name="w_y")(y_BxY)
        w_HxXxOxY = self.param("w_xy", _bilinear_init, (h, dx // h, o, dy // h))
        hx, hy = dx // h, dy // h
        for i in range(h):
            t_BxOY = x_BxX[:, i * hx : (i + 1) * hx] @ w_HxXxOxY[i].reshape(hx, o * hy)
            y_Bx1xY = y_BxY[:, None, i * hy : (i + 1) * hy]
            out = out + jnp.sum(t_BxOY.reshape(-1, o, hy) * y_Bx1xY, axis=-1)
        return out


class FinalMLP(nn.Module):
    mlp1_hidden: Sequence[int] = (1024, 512)
    mlp2_hidden: Sequence[int] = (1024, 512, 256)
    use_bn: bool = False
    use_fs: bool = True
    fs_hidden: Sequence[int] = (1024, 512)
    fs1_context: Sequence[int] = ()
    fs2_context: Sequence[int] = ()
    num_heads: int = 2
    fusion_dim: int = 16

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        if self.use_fs:
            feat1 = FeatureSelection(self.fs_hidden, tuple(self.fs1_context), name="fs1")(e_BxFxD)
            feat2 = FeatureSelection(self.fs_hidden, tuple(self.fs2_context), name="fs2")(e_BxFxD)
        else:
            feat1 = feat2 = e_BxFxD.reshape(e_BxFxD.shape[0], -1)
        x = MLP(self.mlp1_hidden, use_bn=self.use_bn, name="mlp1")(feat1, train)
        y = MLP(self.mlp2_hidden, use_bn=self.use_bn, name="mlp2")(feat2, train)
        return InteractionAggregation(self.fusion_dim, self.num_heads, name="fusion")(x, y)
