"""The shared multi-task head: MMoE (Ma et al., 2018) on a backbone's representation.

Experts are MLPs on h; every task k has a softmax gate over experts and a tower to one logit.
The same head follows every backbone, so candidates differ only in the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diet_jax.models.layers import MLP


class MMoEHead(nn.Module):
    num_tasks: int = 3
    num_experts: int = 4
    expert_hidden: Sequence[int] = (128,)
    gate_hidden: Sequence[int] = ()
    tower_hidden: Sequence[int] = (64,)
    use_bn: bool = False

    @nn.compact
    def __call__(self, h_BxH, train: bool = False):
        experts_ExBxU = jnp.stack(
            [
                MLP(self.expert_hidden, use_bn=self.use_bn, name=f"expert_{e}")(h_BxH, train)
                for e in range(self.num_experts)
            ]
        )
        logits = []
        for k in range(self.num_tasks):
            g_BxE = nn.softmax(
                MLP(self.gate_hidden, output_dim=self.num_experts, name=f"gate_{k}")(h_BxH, train)
            )
            z_BxU = jnp.einsum("be,ebu->bu", g_BxE, experts_ExBxU)
            logits.append(
                MLP(self.tower_hidden, use_bn=self.use_bn, output_dim=1, name=f"tower_{k}")(
                    z_BxU, train
                )
            )
        return jnp.concatenate(logits, axis=-1)
