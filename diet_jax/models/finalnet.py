"""FinalNet (Zhu et al., 2023): factorized interaction blocks with field gating, one or two blocks.

Factorized interaction (FuxiCTR's FactorizedInteraction): h = W x + b split in halves [h2, h1];
    concat residual: out = [h2 ; h1 * h2] (W: in -> out)      sum residual: out = h2 + h1 * h2
    (W: in -> 2 out).
A block stacks, per hidden size: factorized interaction -> [BatchNorm] -> [activation].
Field gating: gates[b, f, :] = sum_f' W[f, f'] e[b, f', :] + c[f] (W = 0, c = 1 at init), and the
block reads the flat [e ; e * gates] (2 F D values).

Multi-task head (decision). FuxiCTR's 2B prediction is y = 0.5 (fc1(h1) + fc2(h2)) with the loss
BCE(y, label) + BCE(y1, sg(y)) + BCE(y2, sg(y)). Here the shared MMoE head takes the place of
fc1 and fc2: in 2B form the backbone returns the pair (h1, h2), and `factory.DenseNet` runs the
one head on each block, averages the two logit vectors (the logit the task loss reads) and sows
the self-distillation terms. A single head for both blocks keeps the head identical across
backbones (the MMoE parameters have the same shapes for every model); it costs one extra head
pass per sample, measured in the README's throughput table. The blocks' widths must therefore
end equal. In 1B form the backbone returns h1 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diet_jax.models.layers import activation, batch_norm, dense

BLOCK_TYPES = ("1B", "2B")
RESIDUAL_TYPES = ("concat", "sum")


class FactorizedInteraction(nn.Module):
    features: int
    residual_type: str = "concat"

    @nn.compact
    def __call__(self, x):
        if self.residual_type == "concat":
            if self.features % 2:
                raise ValueError(
                    f"FinalNet concat residual needs even hidden sizes, got {self.features}."
                )
            h = dense(self.features, name="linear")(x)
        elif self.residual_type == "sum":
            h = dense(2 * self.features, name="linear")(x)
        else:
            raise ValueError(
                f"Unsupported FinalNet residual_type: {self.residual_type!r}; "
                f"expected one of {RESIDUAL_TYPES}."
            )
        h2, h1 = jnp.split(h, 2, axis=-1)  # torch.chunk order: the first half is h2
        if self.residual_type == "concat":
            return jnp.concatenate([h2, h1 * h2], axis=-1)
        return h2 + h1 * h2


class FinalBlock(nn.Module):
    hidden: Sequence[int]
    act: str | None = None
    use_bn: bool = True
    residual_type: str = "concat"

    @nn.compact
    def __call__(self, x, train: bool = False):
        fn = activation(self.act)
        for i, h in enumerate(self.hidden):
            x = FactorizedInteraction(h, self.residual_type, name=f"fi_{i}")(x)
            if self.use_bn:
                x = batch_norm(train, name=f"bn_{i}")(x)
            if fn is not None:
                x = fn(x)
        return x


class FeatureGating(nn.Module):
    """[e ; e * gates] over the field axis, gates an affine map across fields (identity at init)."""

    @nn.compact
    def __call__(self, e_BxFxD):
        f = e_BxFxD.shape[1]
        w_FxF = self.param("w", nn.initializers.zeros, (f, f))
        c_F = self.param("c", nn.initializers.ones, (f,))
        gates_BxFxD = jnp.einsum("gf,bfd->bgd", w_FxF, e_BxFxD) + c_F[:, None]
        return jnp.concatenate([e_BxFxD, e_BxFxD * gates_BxFxD], axis=1)


class FinalNet(nn.Module):
    block_type: str = "2B"
    use_bn: bool = True
    feature_gating: bool = True
    block1_hidden: Sequence[int] = (64, 64, 64)
    block2_hidden: Sequence[int] = (64, 64, 64)
    act: str | None = None
    residual_type: str = "concat"

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Unsupported FinalNet block_type: {self.block_type!r}; expected one of "
                f"{BLOCK_TYPES}."
            )
        b = e_BxFxD.shape[0]
        x1 = FeatureGating(name="gating")(e_BxFxD) if self.feature_gating else e_BxFxD
        block = dict(act=self.act, use_bn=self.use_bn, residual_type=self.residual_type)
        h1 = FinalBlock(self.block1_hidden, **block, name="block1")(x1.reshape(b, -1), train)
        if self.block_type == "1B":
            return h1
        if self.block1_hidden[-1] != self.block2_hidden[-1]:
            raise ValueError(
                "FinalNet 2B feeds both blocks to one shared head: the last sizes of "
                f"block1_hidden {tuple(self.block1_hidden)} and block2_hidden "
                f"{tuple(self.block2_hidden)} must be equal."
            )
        h2 = FinalBlock(self.block2_hidden, **block, name="block2")(e_BxFxD.reshape(b, -1), train)
        return h1, h2
