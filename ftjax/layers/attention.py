"""Multi-head / grouped-query self-attention with an explicit K/V cache.

Two entry points, never a mode string: `prefill` attends within the prompt and returns its K/V for the
cache; `decode` writes one new token's K/V into the cache (donated by the caller, updated in place) and
attends over it. Attention itself is `ftjax.pallas.ops` (Pallas kernel or XLA, chosen by `impl`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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
# twenty-fourth session). On since the twenty-seventh session: with the engine's packed q/k/v params
# (engine.PACK_QKV) the GEMM reads one stored weight, where before XLA concatenated the three every prefill; two
# process-per-variant A/Bs on an H100 gave 350M batch-64 requests -1 to -4% (128/8 and 512/32, beyond the spread of
# the off rows) and 1.3B batch 1 within its spread (bench/RESULTS.md). Off: whole 350M batch-64 requests were no
# faster on an H200 while the weights were concatenated per call (twenty-fifth session). On CPU it is tested against
# the three projections as written.
PACKED_QKV = True


def _cat(arrays, axis):
    """Concatenate on the host when every array is a host (numpy) array, else with jnp (on the device)."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays, axis=axis)
    return jnp.concatenate([jnp.asarray(a) for a in arrays], axis=axis)


def _concat_weights(ws):
    """q, k, v kernels ([d, heads, h] arrays, or int8 QuantizedWeight / QuantizedWeightT) -> one [d, sum, h]."""
    if isinstance(ws[0], QuantizedWeight):
        return QuantizedWeight(_cat([w.q for w in ws], 1), _cat([w.scale for w in ws], 0))
    if isinstance(ws[0], QuantizedWeightT):
        return QuantizedWeightT(_cat([w.qt for w in ws], 0), _cat([w.scale for w in ws], 0))
    return _cat(ws, 1)


# The engine stores each attention block's q, k and v kernels (and biases) as ONE packed projection
# {"qkv": {"kernel" [d, n + 2k, h], "bias" [n + 2k, h]}} (`pack_qkv`, one device per shard): the prefill's GEMM
# then reads it as it is, where XLA's dot merger otherwise concatenated the three weights into a new buffer at
# every call (12.6 us a layer of a GPT 1.3B prefill on an H200: ~0.3 ms of each admit, bench/RESULTS.md fifteenth
# session), and the decode step's small-M kernel and the attention kernel read it at head offsets (the same
# launch as the three weights had). Params laid out either way run the same math; init makes q, k, v apart.
PACKED_KEY = "qkv"


def pack_qkv(params):
    """params (host or device arrays, float or int8) with every attention block's q, k, v projections replaced by
    one packed projection (PACKED_KEY): kernels concatenated on their head axis in that order, biases likewise.
    Blocks without all three, with kernels of different kinds (float and int8), or already packed are left as
    they are; arrays on the host stay on the host."""
    def walk(node):
        if not isinstance(node, dict):
            return node
        if (all(isinstance(node.get(n), dict) and "kernel" in node[n] for n in ("q", "k", "v"))
                and len({type(node[n]["kernel"]) for n in ("q", "k", "v")}) == 1):
            mods = [node[n] for n in ("q", "k", "v")]
            packed = {"kernel": _concat_weights([m["kernel"] for m in mods])}
            if all("bias" in m for m in mods):
                packed["bias"] = _cat([m["bias"] for m in mods], 0)
            out = {k: v for k, v in node.items() if k not in ("q", "k", "v")}
            out[PACKED_KEY] = packed
            return out
        return {k: walk(v) for k, v in node.items()}
    return walk(params)


def unpack_qkv(params, num_heads: int, kv_heads: int):
    """The inverse of `pack_qkv`: every packed projection split back into q [d, n, h], k and v [d, k, h]."""
    cuts = (num_heads, num_heads + kv_heads)

    def split(a, axis):
        if isinstance(a, np.ndarray):
            return np.split(a, cuts, axis=axis)
        return jnp.split(a, cuts, axis=axis)

    def split_w(w):
        if isinstance(w, QuantizedWeight):
            return [QuantizedWeight(q, s) for q, s in zip(split(w.q, 1), split(w.scale, 0))]
        if isinstance(w, QuantizedWeightT):
            return [QuantizedWeightT(q, s) for q, s in zip(split(w.qt, 0), split(w.scale, 0))]
        return split(w, 1)

    def walk(node):
        if not isinstance(node, dict):
            return node
        if isinstance(node.get(PACKED_KEY), dict) and "kernel" in node[PACKED_KEY]:
            p = node[PACKED_KEY]
            out = {k: v for k, v in node.items() if k != PACKED_KEY}
            ws = split_w(p["kernel"])
            bs = split(p["bias"], 0) if "bias" in p else [None] * 3
            for name, w, b in zip(("q", "k", "v"), ws, bs):
                out[name] = {"kernel": w} if b is None else {"kernel": w, "bias": b}
            return out
        return {k: walk(v) for k, v in node.items()}
    return walk(params)


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

    def _packed_params(self):
        """(kernel [d, n + 2k, h], bias [n + 2k, h] or None) of a packed q/k/v projection (`pack_qkv`), or None."""
        if self.is_initializing():
            return None
        p = self.variables.get("params", {}).get(PACKED_KEY)
        return None if p is None else (p["kernel"], p.get("bias"))

    def _split_heads(self, y):
        n, kh = self.cfg.num_heads, self.cfg.kv_heads
        return y[..., :n, :], y[..., n:n + kh, :], y[..., n + kh:, :]

    def _project(self, x, w, bias):
        """x @ w (+ bias) in self.dtype, as `Linear` computes it (the product's and bias add's dtype by its rule)."""
        acc = product_dtype(x, w, 1, self.dtype)
        y = linear(x, w, 1, out_dtype=acc)
        if bias is not None:
            y = y + bias.astype(acc)
        return y.astype(self.dtype)

    def _qkv(self, x, positions):
        packed = self._packed_params()
        if packed is not None:
            q, k, v = self._split_heads(self._project(x, *packed))
        else:
            q, k, v = fused_linears([self.q, self.k, self.v], x)  # [..., n, h], [..., k, h], [..., k, h]
        if self.cfg.position == "rotary":
            q = apply_rotary(q, positions, self.cfg)
            k = apply_rotary(k, positions, self.cfg)
        return q, k, v

    def _packed_qkv(self, x):
        """The prefill's q, k, v as one array [b, t, n + 2k, h] (PACKED_QKV), or None where that path does not
        apply (XLA attention, rotary, a tensor-parallel mesh, init, the small-M kernel, mixed weight kinds)."""
        c = self.cfg
        if (not PACKED_QKV or self.impl != "pallas" or c.position == "rotary" or x.ndim != 3
                or self.is_initializing() or current_attention_mesh() is not None):
            return None
        packed = self._packed_params()
        if packed is not None:
            w, bias = packed
        else:
            ps = [m.variables["params"] for m in (self.q, self.k, self.v)]
            ws = [p["kernel"] for p in ps]
            if len({type(w) for w in ws}) != 1:
                return None
            w = _concat_weights(ws)
            bias = _cat([p["bias"] for p in ps], 0) if c.attn_bias else None
        if _small_m_mode(x, 1, [w]) is not None:
            return None
        return self._project(x, w, bias)

    def prefill(self, x, positions, lengths, cache=None, start=None):
        """x [b, t, d]; positions [b, t]; lengths [b] -> (out [b, t, d], k [b, t, k, h], v [b, t, k, h]).
        cache = (k_cache, v_cache) [B, k, S, h] and start: the K/V go into cache rows start .. start + b - 1
        instead (on the packed path the attention kernel writes them) -> (out, k_cache, v_cache)."""
        qkv = self._packed_qkv(x)
        if qkv is not None:
            n, kh = self.cfg.num_heads, self.cfg.kv_heads
            if cache is not None:
                out, kc, vc = ops.attention_prefill_packed(qkv, n, kh, lengths, impl=self.impl, cache=cache,
                                                           start=start)
                return self.o(out), kc, vc
            out = ops.attention_prefill_packed(qkv, n, kh, lengths, impl=self.impl)
            return (self.o(out), *self._split_heads(qkv)[1:])
        q, k, v = self._qkv(x, positions)
        out = ops.attention_prefill(q, k, v, lengths, impl=self.impl, causal=True)  # [b, t, n, h]
        if cache is not None:
            return (self.o(out), *ops.write_kv_into(cache, k, v, start))
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
        packed = self._packed_params()
        if packed is not None:
            w, bias = packed
            (part, scale), = linear_parts(x, [w])
            if c.position == "rotary":
                q, k, v = self._split_heads(reduce_parts(part, scale, bias).astype(self.dtype))
                srcs, mults, bias = (apply_rotary(q, positions, c)[None], apply_rotary(k, positions, c)[None],
                                     v[None]), None, None
            elif c.kv_heads == c.num_heads:   # the attention kernel reads q, k and v at head offsets
                srcs, mults = (part, None, None), scale
            else:   # grouped query heads: q's heads are regrouped per kv head, so the three go apart
                srcs = self._split_heads(part)
                mults = None if scale is None else self._split_heads(scale)
                bias = None if bias is None else self._split_heads(bias)
            out, k_cache, v_cache = decode_attention_append(*srcs, k_cache, v_cache, positions, mults, bias,
                                                            interpret=interpret)
            return self._o_parts(out), k_cache, v_cache
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
        return self._o_parts(out), k_cache, v_cache

    def _o_parts(self, out):
        """The output projection of the attention's out [b, n, h], left as split-K partials: (parts, scale, bias)."""
        po = self.o.variables["params"]
        (part, scale), = linear_parts(out.astype(self.dtype), [po["kernel"]], 2)
        return part, scale, po["bias"] if self.cfg.attn_bias else None
