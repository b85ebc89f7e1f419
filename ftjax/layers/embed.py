"""Token (and learned position) embeddings; the tied output projection."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


# The tied output projection of a decode step (<= 16 rows, small-M kernel on) through the small-M projection
# kernel, the token table read as a transposed weight [V, D] (K contiguous), instead of XLA's dot. Read when the
# step is traced.
HEAD_SMALL_M = False


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
        if HEAD_SMALL_M:
            from ftjax.layers.linear import _small_m_mode
            mode = _small_m_mode(h, 1)
            if mode is not None and h.shape[-1] == self.dim:
                from ftjax.pallas.small_linear import small_linear
                [y] = small_linear(h.reshape(-1, self.dim), [self.tokens.astype(h.dtype)], transposed=[True],
                                   interpret=mode["interpret"])
                return y.reshape(*h.shape[:-1], self.vocab_size)
        return jnp.einsum("...d,vd->...v", h, self.tokens.astype(h.dtype), preferred_element_type=jnp.float32)
