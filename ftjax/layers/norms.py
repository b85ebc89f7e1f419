"""LayerNorm (with bias) and RMSNorm, computed in float32."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Norm(nn.Module):
    dim: int
    kind: str = "layernorm"  # "layernorm" | "rmsnorm"
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x [..., d]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (self.dim,), self.dtype)
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (self.dim,), self.dtype)
            # mean and mean of squares are two reductions of the same input, which XLA:GPU fuses into one
            # kernel (var from the centred values would be a second, dependent reduction: the profile
            # showed two kernels per LayerNorm). float32; var clamped at 0 against rounding.
            mean = xf.mean(-1, keepdims=True)
            var = jnp.maximum((xf * xf).mean(-1, keepdims=True) - mean * mean, 0.0)
            y = (xf - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale.astype(jnp.float32) \
                + bias.astype(jnp.float32)
        else:
            var = (xf * xf).mean(-1, keepdims=True)
            y = xf * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale.astype(jnp.float32)
        return y.astype(self.dtype)

    def _gamma_beta(self):
        p = self.variables["params"]
        return p["scale"], (p["bias"] if self.kind == "layernorm" else None)

    def add(self, x, parts=None, pscale=None, pbias=None, *, interpret: bool = False):
        """The fused decode path: (x_new, norm(x_new)) with x_new = x + sum(parts, 0) * pscale + pbias, in
        one Pallas kernel (ftjax/pallas/add_norm.py). x [M, d]; parts [S, M, d] float32 or None."""
        from ftjax.pallas.add_norm import add_norm

        gamma, beta = self._gamma_beta()
        return add_norm(x, parts, pscale, pbias, gamma=gamma, beta=beta, kind=self.kind, eps=float(self.eps),
                        interpret=interpret)

    def add_stats(self, x, parts=None, pscale=None, pbias=None, *, interpret: bool = False):
        """The fused decode path: (x_new, NormedInput) with x_new as in `add`; the norm itself is left to the
        consuming projection's kernel (`linear_parts`), which normalises its input tiles from the row
        statistics computed here (one wide kernel, ftjax/pallas/add_norm.py's `add_stats`)."""
        from ftjax.layers.linear import NormedInput
        from ftjax.pallas.add_norm import add_stats

        x_new, stats = add_stats(x, parts, pscale, pbias, interpret=interpret)
        return x_new, NormedInput(x_new, stats, *self._gamma_beta(), self.kind, float(self.eps))

    def add_normalise(self, x, parts=None, pscale=None, pbias=None, *, interpret: bool = False):
        """As `add`, as two kernels spread over the GPU (`add_stats`, then `normalise`) instead of one
        program per row: (x_new, norm(x_new))."""
        from ftjax.pallas.add_norm import add_stats, normalise

        x_new, stats = add_stats(x, parts, pscale, pbias, interpret=interpret)
        return x_new, normalise(x_new, stats, *self._gamma_beta(), kind=self.kind, eps=float(self.eps),
                                interpret=interpret)
