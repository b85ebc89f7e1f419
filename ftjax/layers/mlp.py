"""Feed-forward block: act(x Wi) Wo, or gated (SwiGLU-style) act(x Wg) * (x Wi) Wo."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.layers.linear import Linear, _rows, fused_linears, linear_parts, reduce_parts


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


# Calls of at least this many rows (prefill) with a 16-bit dtype apply a non-gated activation in that dtype, on the
# input projection's 16-bit output, instead of in float32 between two converts: the form XLA's GEMM rewriter can
# take into a cuBLASLt epilogue (bias + GELU; the admit call compiled with xla_gpu_enable_cublaslt). None: off.
# At 1.3B batch 64 512/32 the separate GELU pass is 24 x 454 us of the prefill (bench/RESULTS.md, nineteenth
# session); the switch is untimed.
ACT_LOW_ROWS = None


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
            y = self.wi(x)
            low = (ACT_LOW_ROWS is not None and _rows(y, 1) >= ACT_LOW_ROWS
                   and y.dtype in (jnp.bfloat16, jnp.float16))
            h = activation(self.act, y if low else y.astype(jnp.float32))
        return self.wo(h.astype(self.dtype))

    def parts(self, x):
        """The fused decode path: x [M, d] -> (parts [S, M, d] float32, scale or None, bias or None) of the
        output projection, unreduced (the caller's residual add + norm kernel sums them); the input
        projections' partials are reduced here with bias and activation (one XLA fusion)."""
        mods = [self.wi, self.wg] if self.gated else [self.wi]
        ps = [m.variables["params"] for m in mods]
        ys = [reduce_parts(part, scale, p["bias"] if self.use_bias else None).astype(self.dtype).astype(jnp.float32)
              for (part, scale), p in zip(linear_parts(x, [p["kernel"] for p in ps]), ps)]
        h = activation(self.act, ys[1]) * ys[0] if self.gated else activation(self.act, ys[0])
        po = self.wo.variables["params"]
        (part, scale), = linear_parts(h.astype(self.dtype), [po["kernel"]])
        return part, scale, (po["bias"] if self.use_bias else None)
