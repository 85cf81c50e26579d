"""Multi-field embedding: one table for all fields, rows addressed by per-field offsets.

One (sum of vocabularies) x D table rather than one table per field: a batch's lookup is a single
gather, and sparse row updates (only the rows a batch touches) work on one array.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diet_jax.models.layers import embedding_init


def field_offsets(vocab_sizes: Sequence[int]) -> np.ndarray:
    """Row of the table where each field's ids start."""
    return np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]]).astype(np.int32)


class FieldEmbedding(nn.Module):
    """x_BxF (ids local to each field) -> e_BxFxD."""

    vocab_sizes: Sequence[int]
    embed_dim: int = 32

    @nn.compact
    def __call__(self, x_BxF):
        table_VxD = self.param(
            "table", embedding_init, (int(sum(self.vocab_sizes)), self.embed_dim)
        )
        rows_BxF = x_BxF + jnp.asarray(field_offsets(self.vocab_sizes))
        return jnp.take(table_VxD, rows_BxF, axis=0)
