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

    def add(self, x, parts=None, pscale=None, pbias=None, *, interpret: bool = False):
        """The fused decode path: (x_new, norm(x_new)) with x_new = x + sum(parts, 0) * pscale + pbias, in
        one Pallas kernel (ftjax/pallas/add_norm.py). x [M, d]; parts [S, M, d] float32 or None."""
        from ftjax.pallas.add_norm import add_norm

        p = self.variables["params"]
        return add_norm(x, parts, pscale, pbias, gamma=p["scale"],
                        beta=p["bias"] if self.kind == "layernorm" else None, kind=self.kind, eps=float(self.eps),
                        interpret=interpret)
