"""Token (and learned position) embeddings; the tied output projection."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Embed(nn.Module):
    vocab_size: int            # v (rows, possibly padded)
    dim: int                   # d
    max_positions: int = 0     # p; 0 -> no learned positions
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=0.02)
        self.tokens = self.param("tokens", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                 (self.vocab_size, self.dim), self.dtype)
        if self.max_positions:
            self.positions = self.param("positions", nn.with_logical_partitioning(init, ("positions", "embed")),
                                        (self.max_positions, self.dim), self.dtype)

    def __call__(self, ids, positions):  # ids, positions [...] int32 -> [..., d]
        x = jnp.take(self.tokens, ids, axis=0)
        if self.max_positions:
            x = x + jnp.take(self.positions, positions, axis=0)
        return x.astype(self.dtype)

    def attend(self, h):  # h [..., d] -> [..., v] float32 (tied output embedding)
        return jnp.einsum("...d,vd->...v", h, self.tokens.astype(h.dtype), preferred_element_type=jnp.float32)
