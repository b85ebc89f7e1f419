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
from ftjax.layers.linear import Linear, fused_linears, linear_parts, reduce_parts
from ftjax.layers.position import apply_rotary
from ftjax.pallas import ops


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

    def prefill(self, x, positions, lengths):
        """x [b, t, d]; positions [b, t]; lengths [b] -> (out [b, t, d], k [b, t, k, h], v [b, t, k, h])."""
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
