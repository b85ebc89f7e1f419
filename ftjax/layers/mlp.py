"""Feed-forward block: act(x Wi) Wo, or gated (SwiGLU-style) act(x Wg) * (x Wi) Wo."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.layers.linear import Linear, fused_linears


def activation(name: str, x):
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"activation: unknown {name!r}")


class MLP(nn.Module):
    dim: int        # d
    ffn_dim: int    # f
    act: str = "gelu_tanh"
    gated: bool = False
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x [..., d] -> [..., d]
        d, f = self.dim, self.ffn_dim
        wi = Linear((d,), (f,), ("embed",), ("mlp",), self.use_bias, self.dtype, name="wi")
        if self.gated:
            wg = Linear((d,), (f,), ("embed",), ("mlp",), self.use_bias, self.dtype, name="wg")
            up, gate = fused_linears([wi, wg], x)
            h = activation(self.act, gate.astype(jnp.float32)) * up.astype(jnp.float32)
        else:
            h = activation(self.act, wi(x).astype(jnp.float32))
        return Linear((f,), (d,), ("mlp",), ("embed",), self.use_bias, self.dtype, name="wo")(h.astype(self.dtype))
