"""Decoder-only transformer (GPT-2 / Megatron GPT; rotary, parallel residual, RMSNorm, SwiGLU and GQA
by configuration). Flax modules applied functionally: params and cache in, logits and cache out.

Params (flax "params" collection):
  embed/{tokens [v, d], positions [p, d]}; layers_{i}/{ln1, attn/{q,k,v,o}, ln2, mlp/{wi,(wg),wo}};
  final_norm; lm_head/kernel [d, v] (+ lm_head/bias [v], GPT-J) when the output embedding is untied.
  A block with `shared_layernorm` (GPT-J) has no ln2.
The K/V cache is a list (one entry per layer) of {"k", "v"} arrays [b, k, s, h] owned by the caller.

Decode has two paths with the same results. The plain one runs each module as written. The fused one
(`GPT._fused_mode`: the Pallas small-M projections on with fusion, <= 64 rows, Pallas attention, a
sequential residual, a power-of-two head_dim) keeps every projection's split-K partials unreduced and
hands them to the next kernel: the residual stream travels between blocks as `pending` = (x, partials,
int8 scale, bias), added by the next norm's kernel (ftjax/pallas/add_norm.py), and q/k/v go straight to
the attention kernel that writes the new K/V (`decode_attention_append`). Parallel-residual blocks
(GPT-J, NeoX) take the plain path.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax.layers.attention import Attention
from ftjax.layers.embed import Embed
from ftjax.layers.linear import Linear, fused_decode_mode, layer_decode_mode
from ftjax.layers.mlp import MLP
from ftjax.layers.norms import Norm

_NEG = -1e30

# With the Pallas attention (impl="pallas"), a sequential-residual block's residual add + norm runs as one Pallas
# kernel (ftjax/pallas/add_norm.py) in a prefill (or plain-path decode step) of at least NORM_KERNEL_MIN_ROWS
# tokens, instead of XLA's three (the add with both reductions, the rsqrt, the normalisation): the residual stream
# travels between blocks as (x, y), y the last sub-block's output not yet added. Whole 1.3B requests on an H100
# (bench/RESULTS.md, sixteenth session): batch 64 x 128 tokens 59.24 / 58.24 ms with it against 59.86 / 61.76
# without; batch 1 the same at 512 tokens (48.13 both ways) and slower at 128 (14.21 / 14.35 against 13.70 /
# 13.98), hence the threshold.
NORM_KERNEL = True
NORM_KERNEL_MIN_ROWS = 4096


def _add_norm(norm, x, y):
    """(x + y, norm(x + y)) through one Pallas kernel (`Norm.add`); y None: (x, norm(x)). x, y [..., d]."""
    from ftjax.pallas._common import default_interpret

    d = x.shape[-1]
    xn, h = norm.add(x.reshape(-1, d), None if y is None else y.reshape(1, -1, d), interpret=default_interpret())
    return xn.reshape(x.shape), h.reshape(x.shape)


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        self.ln1 = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        self.attn = Attention(c, self.dtype, self.impl)
        if not c.shared_layernorm:  # GPT-J: one norm feeds attention and MLP; no ln2 params
            self.ln2 = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        self.mlp = MLP(c.hidden, c.ffn_dim, c.activation, c.gated_ffn, c.mlp_bias, self.dtype)

    def _residual(self, x, h1, attn_out):  # x, h1 = ln1(x), attn_out [..., d]
        if self.cfg.parallel_residual:
            return x + attn_out + self.mlp(h1 if self.cfg.shared_layernorm else self.ln2(x))
        x = x + attn_out
        return x + self.mlp(self.ln2(x))

    def prefill(self, x, positions, lengths, cache=None, start=None):  # x [b, t, d] -> (x, k [b, t, k, h], v)
        h1 = self.ln1(x)
        a, k, v = self.attn.prefill(h1, positions, lengths, cache, start)   # (cache: the written caches)
        return self._residual(x, h1, a), k, v

    def decode(self, x, positions, k_cache, v_cache):  # x [b, d]; caches [b, k, s, h]
        h1 = self.ln1(x)
        a, k_cache, v_cache = self.attn.decode(h1, positions, k_cache, v_cache)
        return self._residual(x, h1, a), k_cache, v_cache

    def _pending(self, x, y, attend):
        """The block with the residual stream as (x, y), y the previous block's output not yet added (None:
        nothing), each add + norm one kernel (NORM_KERNEL); attend(h1) -> (a, k, v). Returns ((x, y), k, v)."""
        x, h1 = _add_norm(self.ln1, x, y)
        a, k, v = attend(h1)
        x, h2 = _add_norm(self.ln2, x, a)
        return (x, self.mlp(h2)), k, v

    def prefill_pending(self, x, y, positions, lengths, cache=None, start=None):  # `prefill` on the (x, y) stream
        return self._pending(x, y, lambda h: self.attn.prefill(h, positions, lengths, cache, start))

    def decode_pending(self, x, y, positions, k_cache, v_cache):  # `decode` on the (x, y) stream
        return self._pending(x, y, lambda h: self.attn.decode(h, positions, k_cache, v_cache))

    def decode_fused(self, pending, positions, k_cache, v_cache, interpret: bool, norm: str = "stats"):
        """The fused decode path (sequential residual): pending = (x, parts, scale, bias), the residual
        stream with the previous block's output projection not yet added; returns this block's.
        norm: how each norm runs (ftjax/pallas/add_norm.py): "stats" (`add_stats`; the consuming projection
        normalises its input tiles), "norm" (one `add_norm` kernel), "stats2" (`add_stats` + `normalise`)."""
        method = {"stats": "add_stats", "layer": "add_stats", "norm": "add", "stats2": "add_normalise"}[norm]
        add = lambda n, *a: getattr(n, method)(*a, interpret=interpret)  # noqa: E731
        x, h1 = add(self.ln1, *pending)
        o_pend, k_cache, v_cache = self.attn.decode_fused(h1, positions, k_cache, v_cache, interpret=interpret)
        x, h2 = add(self.ln2, x, *o_pend)
        return (x, *self.mlp.parts(h2)), k_cache, v_cache

    def layer_params(self):
        """(LayerParams, trans flags) of this block for ftjax/pallas/decode_layer.py."""
        import numpy as np

        from ftjax.layers.linear import _flat
        from ftjax.layers.position import rope_inv_freq
        from ftjax.pallas.decode_layer import LayerParams

        def w(mod, n_in=1):
            p = mod.variables["params"]
            q, scale, _, t = _flat(p["kernel"], n_in)
            return q, scale, (p["bias"].reshape(-1) if "bias" in p else None), t

        def nrm(mod):
            p = mod.variables["params"]
            return p["scale"], p.get("bias")

        a, m, c = self.attn, self.mlp, self.cfg
        mods = [(a.q, 1), (a.k, 1), (a.v, 1), (a.o, 2), (m.wi, 1), (m.wo, 1)] + ([(m.wg, 1)] if c.gated_ffn else [])
        ws = [w(mod, n_in) for mod, n_in in mods]
        vals = dict(zip(("ln1_g", "ln1_b"), nrm(self.ln1)))
        vals.update(zip(("ln2_g", "ln2_b"), nrm(self.ln2)))
        for name, (q, scale, bias, _) in zip(("q", "k", "v", "o", "1", "2", "g"), ws):
            vals.update({f"w{name}": q, f"s{name}": scale, f"b{name}": bias})
        if c.position == "rotary":
            vals["rope"] = jnp.asarray(np.asarray(rope_inv_freq(c), np.float32))
        return LayerParams(**vals), tuple(t for *_, t in ws)

    def decode_layer(self, x, stats, positions, k_cache, v_cache, counters, interpret: bool, params, next_qkv=None):
        """The whole block as one persistent kernel (ftjax/pallas/decode_layer.py): x [M, d] and its row
        statistics in -> (x_out, stats_out, k_cache, v_cache, counters). params: this block's
        `layer_params()`; next_qkv: the next block's q/k/v weights (its first tiles may be prefetched)."""
        from ftjax.pallas.decode_layer import decode_layer

        c = self.cfg
        p, trans = params
        return decode_layer(x, stats, positions, k_cache, v_cache, counters, p, trans=trans, norm=c.norm,
                            eps=c.norm_eps, act=c.activation, interpret=interpret, next_qkv=next_qkv)


class GPT(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden, c.max_positions if c.position == "learned" else 0, self.dtype)
        self.layers = [Block(c, self.dtype, self.impl) for _ in range(c.num_layers)]
        self.final_norm = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = Linear((c.hidden,), (c.vocab_size,), ("embed",), ("vocab",), c.lm_head_bias, self.dtype,
                                  low_out=False)

    def logits(self, h):  # h [..., d] (already normed) -> [..., v] float32
        c = self.cfg
        out = self.embed.attend(h) if c.tie_embeddings else self.lm_head(h).astype(jnp.float32)
        if c.vocab < c.vocab_size:  # padded embedding rows are never produced
            out = jnp.where(jnp.arange(c.vocab_size) < c.vocab, out, _NEG)
        return out

    def _norm_kernel(self, rows: int) -> bool:
        """Whether each residual add + norm of this prefill / plain decode step (rows tokens) is one Pallas kernel."""
        return (NORM_KERNEL and rows >= NORM_KERNEL_MIN_ROWS and self.impl == "pallas"
                and not self.cfg.parallel_residual and bool(self.layers))

    def _fused_mode(self, x, cache):
        """The small-M mode when this decode step can take the fused path, else None."""
        from ftjax.pallas.decode_attention import append_supported

        c = self.cfg
        mode = fused_decode_mode(x)
        if (mode is None or self.impl != "pallas" or c.parallel_residual or not cache
                or cache[0]["k"].dtype != x.dtype
                or not append_supported(c.dim_per_head, cache[0]["k"].shape[2])):
            return None
        return mode

    def _layer_mode(self, x, cache):
        """The small-M mode when the decode step runs each block as ONE kernel (fuse="layer",
        ftjax/pallas/decode_layer.py), else None: Pallas attention, a sequential-residual block (GPT-2 /
        Megatron, LLaMA: learned or no positions, or rotary over the whole head in NeoX halves; plain or
        gated MLP) with an activation the kernel has, up to 64 rows, and a device that tells its SM count."""
        from ftjax.pallas import decode_layer as DL
        from ftjax.pallas.decode_attention import append_supported

        c = self.cfg
        mode = layer_decode_mode(x)
        if mode is None or self.impl != "pallas" or c.parallel_residual or not cache:
            return None
        if self.layers[0].attn._packed_params() is not None:   # the layer kernel takes q, k, v apart
            return None
        rotary_ok = c.position != "rotary" or (c.rot_dim == c.dim_per_head and not c.rotary_interleaved)
        ok = (rotary_ok and not c.shared_layernorm and c.activation in DL.ACTIVATIONS
              and cache[0]["k"].dtype == x.dtype and cache[0]["k"].shape[0] == x.shape[0]
              and append_supported(c.dim_per_head, cache[0]["k"].shape[2]) and DL.grid_known(mode["interpret"]))
        return mode if ok else None

    def prefill(self, tokens, lengths, all_logits: bool = False, cache=None, start=None):
        """tokens [b, t] (right padded); lengths [b] >= 1.

        Returns (logits, kv): logits [b, v] at each row's last prompt token (or [b, t, v] when
        all_logits), kv a list per layer of (k, v) [b, t, k, h]. With cache (a list per layer of
        (k_cache, v_cache) [B, k, S, h]) and start, each layer writes its K/V into cache rows start ..
        start + b - 1 as it goes, and kv is the list of written caches.
        """
        return self.prefill_part(tokens, lengths, None, 0, len(self.layers), True, all_logits, cache, start)

    def prefill_part(self, tokens, lengths, carry, lo: int, hi: int, last: bool, all_logits: bool = False,
                     cache=None, start=None):
        """Layers [lo, hi) of `prefill` (the admit cut into several calls: `engine.ADMIT_PIECES`). carry: None
        (lo = 0: the embedding first) or what the part before returned, the residual stream (x, y) (y the
        previous block's output not yet added where each add + norm is one kernel, else None). cache: the
        caches of layers lo .. hi - 1 (or None). Returns (carry, kv) or, with last (hi = the layer count),
        (logits, kv) as `prefill`; kv holds layers lo .. hi - 1."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if carry is None:
            x, y = self.embed(tokens, positions), None
        else:
            x, y = carry
        kv = []
        caches = [None] * (hi - lo) if cache is None else cache
        assert len(caches) == hi - lo, (len(caches), lo, hi)
        if self._norm_kernel(b * t):
            for layer, c in zip(self.layers[lo:hi], caches):
                (x, y), k, v = layer.prefill_pending(x, y, positions, lengths, c, start)
                kv.append((k, v))
        else:
            for layer, c in zip(self.layers[lo:hi], caches):
                x, k, v = layer.prefill(x, positions, lengths, c, start)
                kv.append((k, v))
        if not last:
            return (x, y), kv
        if y is not None:
            x = x + y
        if not all_logits:
            x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [b, d]
        return self.logits(self.final_norm(x)), kv

    def decode(self, tokens, positions, cache):
        """tokens [b]; positions [b]; cache list of {"k", "v"} [b, k, s, h] -> (logits [b, v], cache)."""
        x = self.embed(tokens, positions)
        mode = self._layer_mode(x, cache)
        if mode is not None:
            # One persistent kernel per block (bench/RESULTS.md): the residual stream travels with its row
            # statistics; the counters the kernels synchronise through are created once per step
            from ftjax.pallas.decode_layer import layer_counters, row_stats

            lps = [layer.layer_params() for layer in self.layers]
            counters = layer_counters(x, cache[0]["k"], *lps[0], interpret=mode["interpret"])
            stats = row_stats(x)
            new_cache = []
            for i, (layer, c) in enumerate(zip(self.layers, cache)):
                nxt = (lps[i + 1][0].wq, lps[i + 1][0].wk, lps[i + 1][0].wv) if i + 1 < len(lps) else None
                x, stats, k, v, counters = layer.decode_layer(x, stats, positions, c["k"], c["v"], counters,
                                                              mode["interpret"], lps[i], next_qkv=nxt)
                new_cache.append({"k": k, "v": v})
            return self.logits(self.final_norm(x)), new_cache
        mode = self._fused_mode(x, cache)
        if mode is not None:
            # Fused: each block's output projection stays as split-K partials until the next norm's
            # kernel adds them to the residual stream (bench/RESULTS.md: 16 -> 8 kernels a layer)
            new_cache = []
            pending = (x, None, None, None)
            for layer, c in zip(self.layers, cache):
                pending, k, v = layer.decode_fused(pending, positions, c["k"], c["v"], mode["interpret"],
                                                   norm=mode["fuse"])
                new_cache.append({"k": k, "v": v})
            _, h = self.final_norm.add(*pending, interpret=mode["interpret"])
            return self.logits(h), new_cache
        new_cache = []
        if self._norm_kernel(x.shape[0]):
            y = None
            for layer, c in zip(self.layers, cache):
                (x, y), k, v = layer.decode_pending(x, y, positions, c["k"], c["v"])
                new_cache.append({"k": k, "v": v})
            _, h = _add_norm(self.final_norm, x, y)
            return self.logits(h), new_cache
        for layer, c in zip(self.layers, cache):
            x, k, v = layer.decode(x, positions, c["k"], c["v"])
            new_cache.append({"k": k, "v": v})
        return self.logits(self.final_norm(x)), new_cache


def build(cfg: ModelConfig, dtype=jnp.float32, impl: str = "xla") -> GPT:
    return GPT(cfg, dtype, impl)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32):
    """(shapes, logical axes) of every param: trees of jax.ShapeDtypeStruct and of PartitionSpec-like
    tuples of logical axis names, without allocating anything."""
    model = build(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, jnp.ones((1,), jnp.int32),
                                              method=GPT.prefill))["params"]
    axes = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    return shapes, axes


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Seeded random params (the embedded default model and tests)."""
    model = build(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    p = jax.jit(lambda k: model.init(k, tokens, jnp.ones((1,), jnp.int32), method=GPT.prefill))(jax.random.key(seed))
    return nn.unbox(p["params"])
