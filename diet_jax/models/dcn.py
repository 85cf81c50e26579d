"""DCN (Wang et al., 2017): a cross network beside a deep network, both on the flat embeddings.

x_{l+1} = x_l + x_0 (w_l^T x_l) + b_l, with w_l, b_l in R^{F*D}. The representation handed to
the multi-task head is [x_L ; DNN(x_0)], what FuxiCTR's DCN feeds its logit layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diet_jax.models.layers import MLP, dense


class CrossNet(nn.Module):
    num_layers: int = 3

    @nn.compact
    def __call__(self, x0_BxD):
        x_BxD = x0_BxD
        d = x0_BxD.shape[-1]
        for i in range(self.num_layers):
            w_Bx1 = dense(1, use_bias=False, name=f"w_{i}")(x_BxD)
            b_D = self.param(f"b_{i}", nn.initializers.zeros, (d,))
            x_BxD = x_BxD + x0_BxD * w_Bx1 + b_D
        return x_BxD


class DCN(nn.Module):
    num_cross_layers: int = 3
    hidden: Sequence[int] = (1024, 512, 256)
    use_bn: bool = False

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        x0 = e_BxFxD.reshape(e_BxFxD.shape[0], -1)
        cross = CrossNet(self.num_cross_layers, name="cross")(x0)
        deep = MLP(self.hidden, use_bn=self.use_bn, name="dnn")(x0, train)
        return jnp.concatenate([cross, deep], axis=-1)
