"""Feed-forward block: act(x Wi) Wo, or gated (SwiGLU-style) act(x Wg) * (x Wi) Wo."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.layers.linear import Linear, _small_m_mode, fused_linears, linear_parts, reduce_parts
from ftjax.pallas import gemm_act
from ftjax.pallas._common import default_interpret
from ftjax.sharding.mesh import current_attention_mesh

# A prefill of at least GELU_GEMM_MIN_ROWS tokens with the Pallas kernels (impl="pallas") runs the input projection
# of an ungated MLP as a Pallas GEMM that applies its bias and activation before its one store
# (ftjax/pallas/gemm_act.py), instead of cuBLAS's GEMM and the activation as a pass of its own (GPT-350M batch 64 x
# 128 tokens on an H100: 53 us a layer of 485; bench/RESULTS.md, twenty-fourth session). Off until timed on the
# GPU against cuBLAS (`bash bench/s24_gpu.sh gelu`): the pass it removes runs at copy bandwidth, so the GEMM must
# come within ~35% of cuBLAS's time to gain.
GELU_GEMM = False
GELU_GEMM_MIN_ROWS = 1024


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
    impl: str = "xla"   # "pallas": the prefill may take GELU_GEMM

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
            h = self._act_gemm(x)
            if h is None:
                # float32, a pass of its own at prefill: XLA takes no bias + GELU into a cuBLASLt epilogue, and a
                # bf16 activation measured no faster (bench/gelu_epilogue_probe.py; bench/RESULTS.md, twentieth)
                h = activation(self.act, self.wi(x).astype(jnp.float32))
        return self.wo(h.astype(self.dtype))

    def _act_gemm(self, x):
        """act(x Wi + b) through ftjax/pallas/gemm_act.py where GELU_GEMM applies (a long prefill with the Pallas
        kernels, float weights in x's 16-bit dtype, shapes that fit its tiles, no tensor-parallel mesh), else None."""
        if (not GELU_GEMM or self.impl != "pallas" or self.act not in gemm_act.ACTIVATIONS
                or self.is_initializing() or x.dtype not in (jnp.bfloat16, jnp.float16)
                or jnp.dtype(self.dtype) != x.dtype or current_attention_mesh() is not None):
            return None
        p = self.wi.variables["params"]
        w = p["kernel"]
        rows = x.size // x.shape[-1]
        if (not isinstance(w, jax.Array) or w.dtype != x.dtype or rows < GELU_GEMM_MIN_ROWS
                or _small_m_mode(x, 1, (w,)) is not None or not gemm_act.supported(*w.shape)):
            return None
        y = gemm_act.linear_act(x.reshape(rows, -1), w, p["bias"] if self.use_bias else None, activation=self.act,
                                interpret=default_interpret())
        return y.reshape(x.shape[:-1] + (w.shape[1],))

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
