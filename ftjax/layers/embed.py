"""Token (and learned position) embeddings; the tied output projection.

The token table may be int8 (`ftjax.quantize`, mode "int8-embed"): a QuantizedWeightT(qt int8 [v, d],
scale [v]) whose rows are looked up as qt[id] * scale[id], and which the tied head reads through the one
linear op (`ftjax.layers.linear.linear`, the small-M kernel in a decode step) like any int8 weight.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.layers.linear import QuantizedWeightT, linear


class Embed(nn.Module):
    vocab_size: int            # v (rows, possibly padded)
    dim: int                   # d
    max_positions: int = 0     # p; 0 -> no learned positions
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=0.02)
        # an int8 table (QuantizedWeightT) comes back as it is: its first leaf qt has the table's shape
        self.tokens = self.param("tokens", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                 (self.vocab_size, self.dim), self.dtype)
        if self.max_positions:
            self.positions = self.param("positions", nn.with_logical_partitioning(init, ("positions", "embed")),
                                        (self.max_positions, self.dim), self.dtype)

    def __call__(self, ids, positions):  # ids, positions [...] int32 -> [..., d]
        t = self.tokens
        if isinstance(t, QuantizedWeightT):
            x = (jnp.take(t.qt, ids, axis=0).astype(jnp.float32)
                 * jnp.take(t.scale, ids, axis=0).astype(jnp.float32)[..., None])
        else:
            x = jnp.take(t, ids, axis=0)
        if self.max_positions:
            x = x + jnp.take(self.positions, positions, axis=0)
        return x.astype(self.dtype)

    def attend(self, h):  # h [..., d] -> [..., v] float32 (tied output embedding)
        if isinstance(self.tokens, QuantizedWeightT):
            return linear(h, self.tokens, 1)
        return jnp.einsum("...d,vd->...v", h, self.tokens.astype(h.dtype), preferred_element_type=jnp.float32)
