"""DCNv2 (Wang et al., 2021): a full-rank or low-rank-mixture cross network and a deep network.

Cross layer (CrossNetV2):  x_{l+1} = x_l + x_0 * (W_l x_l + b_l),  W_l in R^{D x D}.
Low-rank mixture (CrossNetMix), E experts of rank r, gates shared across layers:
    v_e = tanh(C_{l,e} tanh(V_{l,e}^T x_l)),  expert_e = x_0 * (U_{l,e} v_e + b_l)
    x_{l+1} = x_l + sum_e softmax_e(G_e^T x_l) expert_e
Structures, as FuxiCTR names them (h is what its logit layer `fc` reads, here the MMoE head):
    parallel: h = [cross(x0) ; MLP_par(x0)]      stacked: h = MLP_stk(cross(x0))
    stacked_parallel: h = [MLP_stk(cross(x0)) ; MLP_par(x0)]      crossnet_only: h = cross(x0)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diet_jax.models.layers import MLP, dense

STRUCTURES = ("parallel", "stacked", "stacked_parallel", "crossnet_only")


def stacked_xavier_normal(key, shape, dtype=jnp.float32):
    """torch.nn.init.xavier_normal_ on a tensor of rank >= 2, with torch's fans.

    torch takes fan_in = shape[1] * prod(shape[2:]) and fan_out = shape[0] * prod(shape[2:]);
    flax's variance_scaling reads the last two axes, which differs for CrossNetMix's (E, D, r).
    """
    receptive = 1
    for s in shape[2:]:
        receptive *= s
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    std = (2.0 / (fan_in + fan_out)) ** 0.5
    return std * jax.random.normal(key, shape, dtype)


def _gate_init(key, shape, dtype=jnp.float32):
    """Columns of a (D, E) matrix, each initialised as torch initialises a Linear(D, 1)."""
    return (2.0 / (shape[0] + 1)) ** 0.5 * jax.random.normal(key, shape, dtype)


class CrossNetV2(nn.Module):
    num_layers: int = 3

    @nn.compact
    def __call__(self, x0_BxD):
        x_BxD = x0_BxD
        for i in range(self.num_layers):
            x_BxD = x_BxD + x0_BxD * dense(x0_BxD.shape[-1], name=f"w_{i}")(x_BxD)
        return x_BxD


class CrossNetMix(nn.Module):
    """The low-rank mixture of cross experts; all experts of a layer in one einsum."""

    num_layers: int = 3
    low_rank: int = 32
    num_experts: int = 4

    @nn.compact
    def __call__(self, x0_BxD):
        d, e, r = x0_BxD.shape[-1], self.num_experts, self.low_rank
        # One Linear(D, 1) gate per expert, shared by all layers: xavier fans (D, 1) each.
        gates_DxE = self.param("gates", _gate_init, (d, e))
        x_BxD = x0_BxD
        for i in range(self.num_layers):
            u_ExDxR = self.param(f"U_{i}", stacked_xavier_normal, (e, d, r))
            v_ExDxR = self.param(f"V_{i}", stacked_xavier_normal, (e, d, r))
            c_ExRxR = self.param(f"C_{i}", stacked_xavier_normal, (e, r, r))
            b_D = self.param(f"b_{i}", nn.initializers.zeros, (d,))
            v_BxExR = jnp.tanh(jnp.einsum("bd,edr->ber", x_BxD, v_ExDxR))
            v_BxExR = jnp.tanh(jnp.einsum("ers,bes->ber", c_ExRxR, v_BxExR))
            uv_BxExD = jnp.einsum("edr,ber->bed", u_ExDxR, v_BxExR)
            experts_BxExD = x0_BxD[:, None, :] * (uv_BxExD + b_D)
            g_BxE = nn.softmax(x_BxD @ gates_DxE, axis=-1)
            x_BxD = x_BxD + jnp.einsum("be,bed->bd", g_BxE, experts_BxExD)
        return x_BxD


class DCNv2(nn.Module):
    structure: str = "parallel"
    num_cross_layers: int = 3
    low_rank_mixture: bool = False
    low_rank: int = 32
    num_experts: int = 4
    stacked_hidden: Sequence[int] = (500, 500, 500)
    parallel_hidden: Sequence[int] = (500, 500, 500)
    use_bn: bool = False

    @nn.compact
    def __call__(self, e_BxFxD, train: bool = False):
        if self.structure not in STRUCTURES:
            raise ValueError(
                f"Unsupported DCNv2 structure: {self.structure!r}; expected one of {STRUCTURES}."
            )
        x0 = e_BxFxD.reshape(e_BxFxD.shape[0], -1)
        if self.low_rank_mixture:
            cross = CrossNetMix(
                self.num_cross_layers, self.low_rank, self.num_experts, name="cross"
            )
        else:
            cross = CrossNetV2(self.num_cross_layers, name="cross")
        cross_out = cross(x0)
        if self.structure == "crossnet_only":
            return cross_out
        if self.structure in ("stacked", "stacked_parallel"):
            stacked = MLP(self.stacked_hidden, use_bn=self.use_bn, name="stacked_dnn")(
                cross_out, train
            )
            if self.structure == "stacked":
                return stacked
            cross_out = stacked
        parallel = MLP(self.parallel_hidden, use_bn=self.use_bn, name="parallel_dnn")(x0, train)
        return jnp.concatenate([cross_out, parallel], axis=-1)
