"""Feed-forward block: act(x Wi) Wo, or gated (SwiGLU-style) act(x Wg) * (x Wi) Wo."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.layers.linear import Linear, fused_linears, linear_parts, reduce_parts


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

    def setup(self):
        d, f = self.dim, self.ffn_dim
        self.wi = Linear((d,), (f,), ("embed",), ("mlp",), self.use_bias, self.dtype)
        if self.gated:
            self.wg = Linear((d,), (f,), ("embed",), ("mlp",), self.use_bias, self.dtype)
        self.wo = Linear((f,), (d,), ("mlp",), ("embed",), self.use_bias, self.dtype)

    def __call__(self, x):  # x [..., d] -> [..., d]
        if self.gated:
            up, gate = fused_linears([self.wi, self.wg], x)
            h = activation(self.act, gate.astype(jnp.float32)) * up.astype(jnp.float32)
        else:
            # float32, a pass of its own at prefill: XLA takes no bias + GELU into a cuBLASLt epilogue, and a bf16
            # activation measured no faster (bench/gelu_epilogue_probe.py; bench/RESULTS.md, twentieth session)
            h = activation(self.act, self.wi(x).astype(jnp.float32))
        return self.wo(h.astype(self.dtype))

    def parts(self, x):
        """The fused decode path: x [M, d] -> (parts [S, M, d] float32, scale or None, bias or None) of the
        output projection, unreduced (the caller's residual add + norm kernel sums them); the input
        projections' partials are reduced here with bias and activation (one XLA fusion). Finishing them in the
        output projection's own tiles instead (each program summing the partials of its K range) doubled that
        kernel, 13 -> 23 us a 1.3B layer, for the ~1 us the fusion costs (bench/RESULTS.md, twenty-first session)."""
        mods = [self.wi, self.wg] if self.gated else [self.wi]
        ps = [m.variables["params"] for m in mods]
        ys = [reduce_parts(part, scale, p["bias"] if self.use_bias else None).astype(self.dtype).astype(jnp.float32)
              for (part, scale), p in zip(linear_parts(x, [p["kernel"] for p in ps]), ps)]
        h = activation(self.act, ys[1]) * ys[0] if self.gated else activation(self.act, ys[0])
        po = self.wo.variables["params"]
        (part, scale), = linear_parts(h.astype(self.dtype), [po["kernel"]])
        return part, scale, (po["bias"] if self.use_bias else None)
