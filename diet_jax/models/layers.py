"""Shared layers and initializers, with FuxiCTR's conventions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torch.nn.init.xavier_normal_: an untruncated normal with variance 2 / (fan_in + fan_out).
# flax's xavier_normal truncates; this matches the reference exactly.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
embedding_init = nn.initializers.normal(stddev=1e-4)

# torch defaults: BatchNorm1d momentum 0.1 (flax: 0.9) and eps 1e-5; LayerNorm eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5


def dense(features: int, *, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    """nn.Dense with xavier-normal kernel and zero bias (FuxiCTR's reset_parameters)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=xavier_normal,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, name=name)


ACTIVATIONS: dict[str, Callable | None] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "none": None,
}


def activation(name: str | None) -> Callable | None:
    key = "none" if name is None else name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(
            f"Unsupported activation: {name!r}; expected one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[key]


class MLP(nn.Module):
    """FuxiCTR's MLP_Block: per hidden layer Dense -> [BatchNorm] -> activation.

    `output_dim` adds a final Dense with no activation; without it the last hidden layer is returned.
    Dropout is not implemented: every reference default uses 0.
    """

    hidden: Sequence[int]
    act: str | None = "relu"
    use_bn: bool = False
    output_dim: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        fn = activation(self.act)
        for i, h in enumerate(self.hidden):
            x = dense(h, name=f"dense_{i}")(x)
            if self.use_bn:
                x = batch_norm(train, name=f"bn_{i}")(x)
            if fn is not None:
                x = fn(x)
        if self.output_dim is not None:
            x = dense(self.output_dim, name="out")(x)
        return x
