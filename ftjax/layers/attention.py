"""Multi-head / grouped-query self-attention with an explicit K/V cache.

Two entry points, never a mode string: `prefill` attends within the prompt and returns its K/V for the
cache; `decode` writes one new token's K/V into the cache (donated by the caller, updated in place) and
attends over it. Attention itself is `ftjax.pallas.ops` (Pallas kernel or XLA, chosen by `impl`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax.layers.linear import (Linear, QuantizedWeight, QuantizedWeightT, _small_m_mode, fused_linears, linear,
                                 linear_parts, product_dtype, reduce_parts)
from ftjax.layers.position import apply_rotary
from ftjax.pallas import ops
from ftjax.sharding.mesh import current_attention_mesh

# A prefill with the Pallas attention and no rotary embedding may project q, k and v as one GEMM whose output
# ([b, t, n + 2k, h], bias added in the GEMM's epilogue) the attention kernel reads in place
# (`ops.attention_prefill_packed`); the K/V for the cache are slices of it. Without it XLA merges the three
# GEMMs by itself but splits the product with three bias-add fusions that each copy a third of it (GPT-350M
# batch 64 x 128 tokens on an H100: 14 us each a layer, ~1 ms of the 14.4 ms prefill; bench/RESULTS.md,
# twenty-fourth session). Off: whole 350M batch-64 requests were no faster with it on an H200 (128/8 within the
# spread, 512/32 2-3% slower; twenty-fifth session, `bash bench/s24_gpu.sh packed`); on CPU it is tested against the
# three projections as written.
PACKED_QKV = False


def _concat_weights(ws):
    """q, k, v kernels ([d, heads, h] arrays, or int8 QuantizedWeight / QuantizedWeightT) -> one [d, sum, h]."""
    if isinstance(ws[0], QuantizedWeight):
        return QuantizedWeight(jnp.concatenate([w.q for w in ws], axis=1),
                               jnp.concatenate([w.scale for w in ws], axis=0))
    if isinstance(ws[0], QuantizedWeightT):
        return QuantizedWeightT(jnp.concatenate([w.qt for w in ws], axis=0),
                                jnp.concatenate([w.scale for w in ws], axis=0))
    return jnp.concatenate(ws, axis=1)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        d, n, k, h = c.hidden, c.num_heads, c.kv_heads, c.dim_per_head
        self.q = Linear((d,), (n, h), ("embed",), ("heads", "head_dim"), c.attn_bias, self.dtype)
        self.k = Linear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), c.attn_bias, self.dtype)
        self.v = Linear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), c.attn_bias, self.dtype)
        self.o = Linear((n, h), (d,), ("heads", "head_dim"), ("embed",), c.attn_bias, self.dtype)

    def _qkv(self, x, positions):
        q, k, v = fused_linears([self.q, self.k, self.v], x)  # [..., n, h], [..., k, h], [..., k, h]
        if self.cfg.position == "rotary":
            q = apply_rotary(q, positions, self.cfg)
            k = apply_rotary(k, positions, self.cfg)
        return q, k, v

    def _packed_qkv(self, x):
        """The prefill's q, k, v as one array [b, t, n + 2k, h] (PACKED_QKV), or None where that path does not
        apply (XLA attention, rotary, a tensor-parallel mesh, init, the small-M kernel, mixed weight kinds)."""
        c = self.cfg
        mods = (self.q, self.k, self.v)
        if (not PACKED_QKV or self.impl != "pallas" or c.position == "rotary" or x.ndim != 3
                or self.is_initializing() or current_attention_mesh() is not None):
            return None
        ps = [m.variables["params"] for m in mods]
        ws = [p["kernel"] for p in ps]
        if len({type(w) for w in ws}) != 1 or _small_m_mode(x, 1, ws) is not None:
            return None
        w = _concat_weights(ws)
        acc = product_dtype(x, w, 1, self.dtype)   # the rule of `Linear`
        y = linear(x, w, 1, out_dtype=acc)
        if c.attn_bias:
            y = y + jnp.concatenate([p["bias"] for p in ps], axis=0).astype(acc)
        return y.astype(self.dtype)

    def prefill(self, x, positions, lengths):
        """x [b, t, d]; positions [b, t]; lengths [b] -> (out [b, t, d], k [b, t, k, h], v [b, t, k, h])."""
        qkv = self._packed_qkv(x)
        if qkv is not None:
            n, kh = self.cfg.num_heads, self.cfg.kv_heads
            out = ops.attention_prefill_packed(qkv, n, kh, lengths, impl=self.impl)
            return self.o(out), qkv[:, :, n:n + kh], qkv[:, :, n + kh:]
        q, k, v = self._qkv(x, positions)
        out = ops.attention_prefill(q, k, v, lengths, impl=self.impl, causal=True)  # [b, t, n, h]
        return self.o(out), k, v

    def decode(self, x, positions, k_cache, v_cache):
        """x [b, d]; positions [b] (where the new token goes); k_cache, v_cache [b, k, s, h].

        Returns (out [b, d], k_cache, v_cache) with the new token's K/V written at `positions`.
        """
        q, k, v = self._qkv(x, positions)  # [b, n, h], [b, k, h]
        rows = jnp.arange(x.shape[0])
        k_cache = k_cache.at[rows, :, positions].set(k.astype(k_cache.dtype))
        v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype))
        out = ops.attention_decode(q, k_cache, v_cache, positions + 1, impl=self.impl)  # [b, n, h]
        return self.o(out), k_cache, v_cache

    def decode_fused(self, x, positions, k_cache, v_cache, *, interpret: bool = False):
        """The fused decode path (small-M kernel on, ftjax/pallas/decode_attention.py's append kernel):
        x [b, d] (normed, or a NormedInput) -> ((parts [S, b, d], scale, bias) of the output projection,
        k_cache, v_cache).

        q/k/v leave their projection as split-K partials that the attention kernel sums itself, biases, and
        writes into the cache (rotary models finish q and k in XLA first: the rotation needs whole values)."""
        from ftjax.pallas.decode_attention import decode_attention_append

        c = self.cfg
        mods = [self.q, self.k, self.v]
        ps = [m.variables["params"] for m in mods]
        parts = linear_parts(x, [p["kernel"] for p in ps])
        biases = tuple(p["bias"] for p in ps) if c.attn_bias else None
        if c.position == "rotary":
            fin = [reduce_parts(part, scale, p["bias"] if c.attn_bias else None).astype(self.dtype)
                   for (part, scale), p in zip(parts, ps)]
            q = apply_rotary(fin[0], positions, c)
            k = apply_rotary(fin[1], positions, c)
            srcs, mults, biases = (q[None], k[None], fin[2][None]), None, None
        else:
            srcs = tuple(pt for pt, _ in parts)
            scales = [sc for _, sc in parts]
            mults = None
            if any(sc is not None for sc in scales):
                mults = tuple(jnp.ones(m.out_shape, jnp.float32) if sc is None else sc
                              for m, sc in zip(mods, scales))
        out, k_cache, v_cache = decode_attention_append(*srcs, k_cache, v_cache, positions, mults, biases,
                                                        interpret=interpret)
        po = self.o.variables["params"]
        (part, scale), = linear_parts(out.astype(self.dtype), [po["kernel"]], 2)
        return (part, scale, po["bias"] if c.attn_bias else None), k_cache, v_cache
