"""T5 encoder-decoder (HF T5 v1.0 and v1.1 semantics), Flax modules applied functionally.

Params: embed/tokens [v, d]; encoder/{rel_bias/table [buckets, n], layers_i/{ln_attn, attn/{q,k,v,o},
ln_ff, mlp/{wi,(wg),wo}}, final_norm}; decoder/{rel_bias/table, layers_i/{ln_self, self_attn, ln_cross,
cross_attn, ln_ff, mlp}, final_norm}; lm_head/kernel [d, v] when untied. By default (T5) no biases
anywhere and RMS norms.

Option-gated variants (T5Config; Megatron-LM T5 uses all four): `norm="layernorm"` (every norm gets a
`bias` [d]), `linear_bias` (q/k/v/o and FFN linears get `bias`), `position="learned"` (embed/positions
[max_positions, d] added to the token embedding in both stacks — encoder positions 0..t-1, decoder
positions 0..t-1 or the `positions` argument at decode — and no rel_bias tables), `lm_head_bias`
(lm_head_bias [v] added to the logits). Attention scaling stays folded into the query weights (and bias).

Cache (per decoder layer): self-attention "k", "v" [B, n, S, h] written one id per step, and the
cross-attention "ck", "cv" [B, n, S, h] computed once at prefill from the encoder output; plus
"enc_len" [B]. Attention has no 1/sqrt(h) scaling (T5 folds it into the weights).

Kernels: the encoder's non-causal attention with its relative-position bias and the cross attention
go through `ftjax.pallas.ops` (prefill kernel with bias; decode kernel without bias). The decoder's
self-attention at decode needs the relative-position bias of every key, which the decode kernel does
not take, so it runs in XLA here (one query per step: a [B, n, S] score row, cheap beside the
cross attention and the FFN).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.config import T5Config
from ftjax.layers.embed import Embed
from ftjax.layers.linear import Linear
from ftjax.layers.mlp import MLP
from ftjax.layers.norms import Norm
from ftjax.models.families import write_rows
from ftjax.pallas import ops

_NEG = -1e30


def relative_bucket(rel, bidirectional: bool, num_buckets: int, max_distance: int):
    """rel = key position - query position (int32, any shape) -> bucket ids (HF's T5 bucketing)."""
    ret = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).astype(rel.dtype) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(nf / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class RelBias(nn.Module):
    cfg: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos, k_pos):  # q_pos [..., t], k_pos [..., s] int32 -> bias [..., n, t, s] f32
        c = self.cfg
        table = self.param("table", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("buckets", "heads")),
                           (c.relative_buckets, c.num_heads), jnp.float32)
        rel = k_pos[..., None, :] - q_pos[..., :, None]                       # [..., t, s]
        b = relative_bucket(rel, self.bidirectional, c.relative_buckets, c.relative_max_distance)
        out = jnp.take(table.astype(jnp.float32), b, axis=0)                 # [..., t, s, n]
        return jnp.moveaxis(out, -1, -3)


class Attn(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        d, n, h = c.hidden, c.num_heads, c.head_dim
        b = c.linear_bias
        self.q = Linear((d,), (n, h), ("embed",), ("heads", "head_dim"), b, self.dtype)
        self.k = Linear((d,), (n, h), ("embed",), ("kv_heads", "head_dim"), b, self.dtype)
        self.v = Linear((d,), (n, h), ("embed",), ("kv_heads", "head_dim"), b, self.dtype)
        self.o = Linear((n, h), (d,), ("heads", "head_dim"), ("embed",), b, self.dtype)

    def kv(self, x):  # x [..., d] -> (k, v) [..., n, h]
        return self.k(x), self.v(x)


def _mlp(c: T5Config, dtype, name=None):
    return MLP(c.hidden, c.ffn_dim, c.activation, c.gated_ffn, c.linear_bias, dtype, name=name)


class EncoderLayer(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, bias, lengths):  # x [b, t, d]; bias [1, n, t, t] or None
        c = self.cfg
        attn = Attn(c, self.dtype, name="attn")
        h = Norm(c.hidden, c.norm, c.norm_eps, self.dtype, name="ln_attn")(x)
        q, (k, v) = attn.q(h), attn.kv(h)
        a = ops.attention_prefill(q, k, v, lengths, impl=self.impl, causal=False, bias=bias, scale=1.0)
        x = x + attn.o(a)
        return x + _mlp(c, self.dtype, "mlp")(Norm(c.hidden, c.norm, c.norm_eps, self.dtype, name="ln_ff")(x))


class DecoderLayer(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        self.ln_self = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        self.self_attn = Attn(c, self.dtype)
        self.ln_cross = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        self.cross_attn = Attn(c, self.dtype)
        self.ln_ff = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)
        self.mlp = _mlp(c, self.dtype)

    def cross_kv(self, enc):  # enc [b, s, d] -> (ck, cv) [b, s, n, h]
        return self.cross_attn.kv(enc)

    def full(self, x, self_bias, dec_len, ck, cv, enc_len):
        """Whole decoder sequence at once (logits / reference). x [b, t, d]; ck/cv [b, s, n, h]."""
        h = self.ln_self(x)
        q, (k, v) = self.self_attn.q(h), self.self_attn.kv(h)
        x = x + self.self_attn.o(ops.attention_prefill(q, k, v, dec_len, impl=self.impl, causal=True,
                                                       bias=self_bias, scale=1.0))
        q = self.cross_attn.q(self.ln_cross(x))
        x = x + self.cross_attn.o(ops.attention_prefill(q, ck, cv, enc_len, impl=self.impl, causal=False,
                                                        scale=1.0))
        return x + self.mlp(self.ln_ff(x))

    def step(self, x, positions, self_bias, cache, enc_len):
        """One id per row. x [b, d]; positions [b]; self_bias [b, n, S] or None; cache {k, v, ck, cv} [b, n, S, h]."""
        h = self.ln_self(x)
        q, (k, v) = self.self_attn.q(h), self.self_attn.kv(h)            # [b, n, h]
        rows = jnp.arange(x.shape[0])
        kc = cache["k"].at[rows, :, positions].set(k.astype(cache["k"].dtype))
        vc = cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))
        s = jnp.einsum("bnh,bnsh->bns", q, kc, preferred_element_type=jnp.float32)
        if self_bias is not None:
            s = s + self_bias
        mask = jnp.arange(kc.shape[2])[None, :] <= positions[:, None]     # [b, S]
        p = jax.nn.softmax(jnp.where(mask[:, None, :], s, _NEG), axis=-1)
        a = jnp.einsum("bns,bnsh->bnh", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        x = x + self.self_attn.o(a.astype(self.dtype))
        q = self.cross_attn.q(self.ln_cross(x))
        a = ops.attention_decode(q, cache["ck"], cache["cv"], enc_len, impl=self.impl, scale=1.0)
        x = x + self.cross_attn.o(a)
        x = x + self.mlp(self.ln_ff(x))
        return x, dict(cache, k=kc, v=vc)


class Encoder(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, lengths):  # x [b, t, d] embedded -> [b, t, d]
        c = self.cfg
        pos = jnp.arange(x.shape[1], dtype=jnp.int32)
        bias = RelBias(c, True, name="rel_bias")(pos, pos)[None] if c.position == "relative" else None  # [1, n, t, t]
        for i in range(c.num_encoder_layers):
            x = EncoderLayer(c, self.dtype, self.impl, name=f"layers_{i}")(x, bias, lengths)
        return Norm(c.hidden, c.norm, c.norm_eps, self.dtype, name="final_norm")(x)


class Decoder(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        self.rel_bias = RelBias(c, False) if c.position == "relative" else None
        self.layers = [DecoderLayer(c, self.dtype, self.impl) for _ in range(c.num_decoder_layers)]
        self.final_norm = Norm(c.hidden, c.norm, c.norm_eps, self.dtype)

    def cross_kv(self, enc):
        return [layer.cross_kv(enc) for layer in self.layers]

    def full(self, x, dec_len, enc, enc_len):
        pos = jnp.arange(x.shape[1], dtype=jnp.int32)
        bias = self.rel_bias(pos, pos)[None] if self.rel_bias is not None else None
        for layer in self.layers:
            ck, cv = layer.cross_kv(enc)
            x = layer.full(x, bias, dec_len, ck, cv, enc_len)
        return self.final_norm(x)

    def step(self, x, positions, cache):
        S = cache["layers"][0]["k"].shape[2]
        bias = (self.rel_bias(positions[:, None], jnp.arange(S, dtype=jnp.int32)[None, :])[:, :, 0]  # [b, n, S]
                if self.rel_bias is not None else None)
        new = []
        for layer, c in zip(self.layers, cache["layers"]):
            x, c = layer.step(x, positions, bias, c, cache["enc_len"])
            new.append(c)
        return self.final_norm(x), {"layers": new, "enc_len": cache["enc_len"]}


class T5(nn.Module):
    cfg: T5Config
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden, c.max_positions if c.position == "learned" else 0, self.dtype)
        self.encoder = Encoder(c, self.dtype, self.impl)
        self.decoder = Decoder(c, self.dtype, self.impl)
        if not c.tie_embeddings:
            self.lm_head = Linear((c.hidden,), (c.vocab_size,), ("embed",), ("vocab",), False, self.dtype,
                                  low_out=False)
        if c.lm_head_bias:
            self.lm_head_bias = self.param("lm_head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                           (c.vocab_size,), self.dtype)

    def logits(self, h):  # [..., d] -> [..., v] f32
        if self.cfg.scale_logits:
            h = (h.astype(jnp.float32) * self.cfg.hidden ** -0.5).astype(h.dtype)
        out = self.embed.attend(h) if self.cfg.tie_embeddings else self.lm_head(h).astype(jnp.float32)
        if self.cfg.lm_head_bias:
            out = out + self.lm_head_bias.astype(jnp.float32)
        return out

    def _positions(self, tokens):  # tokens [b, t] -> learned-position ids 0..t-1 (zeros when unused)
        if self.cfg.position != "learned":
            return jnp.zeros_like(tokens)
        return jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=tokens.dtype), tokens.shape)

    def encode(self, tokens, lengths):
        """tokens [b, t]; lengths [b] -> (encoder output [b, t, d], cross K/V per decoder layer [b, t, n, h])."""
        enc = self.encoder(self.embed(tokens, self._positions(tokens)), lengths)
        return enc, self.decoder.cross_kv(enc)

    def __call__(self, enc_tokens, enc_len, dec_tokens, dec_len):
        """Full forward: -> logits [b, t_dec, v] (teacher forcing)."""
        enc, _ = self.encode(enc_tokens, enc_len)
        x = self.embed(dec_tokens, self._positions(dec_tokens))
        return self.logits(self.decoder.full(x, dec_len, enc, enc_len))

    def decode(self, tokens, positions, cache):
        """tokens [B]; positions [B] -> (logits [B, v], cache)."""
        x = self.embed(tokens, positions if self.cfg.position == "learned" else jnp.zeros_like(tokens))
        h, cache = self.decoder.step(x, positions, cache)
        return self.logits(h), cache


def build(cfg: T5Config, dtype=jnp.float32, impl: str = "xla") -> T5:
    return T5(cfg, dtype, impl)


def _dummy():
    t = jnp.zeros((1, 1), jnp.int32)
    one = jnp.ones((1,), jnp.int32)
    return t, one, t, one


def abstract_params(cfg: T5Config, dtype=jnp.float32):
    model = build(cfg, dtype)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy()))["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(cfg: T5Config, seed: int = 0, dtype=jnp.float32):
    model = build(cfg, dtype)
    return nn.unbox(jax.jit(lambda k: model.init(k, *_dummy()))(jax.random.key(seed))["params"])


class T5Family:
    """Engine interface for T5: prefill runs the encoder and the cross K/V; the decoder start id is
    the pending id of every row (nothing is sampled at prefill)."""

    samples_at_prefill = False

    def __init__(self, cfg: T5Config, dtype, impl: str):
        self.cfg, self.dtype = cfg, dtype
        self.model = build(cfg, dtype, impl)

    def init_cache(self, B: int, S: int):
        c = self.cfg
        shape = (B, c.num_heads, S, c.head_dim)
        z = lambda: jnp.zeros(shape, self.dtype)  # noqa: E731
        return {"layers": [{"k": z(), "v": z(), "ck": z(), "cv": z()} for _ in range(c.num_decoder_layers)],
                "enc_len": jnp.ones((B,), jnp.int32)}

    def prefill(self, params, tokens, lengths):
        _, cross = self.model.apply({"params": params}, tokens, lengths, method=T5.encode)
        return None, {"cross": cross, "enc_len": lengths}

    def write_prefix(self, cache, prefix, src, slots, start=None):
        layers = []
        for layer, (ck, cv) in zip(cache["layers"], prefix["cross"]):
            layers.append(dict(layer, ck=write_rows(layer["ck"], jnp.swapaxes(ck, 1, 2), src, slots, start),
                               cv=write_rows(layer["cv"], jnp.swapaxes(cv, 1, 2), src, slots, start)))
        enc_len = write_rows(cache["enc_len"], prefix["enc_len"], src, slots, start)
        return {"layers": layers, "enc_len": enc_len}

    def reorder(self, cache, src):
        """Beam search: only the decoder's self-attention K/V differ between beams; the cross K/V and
        encoder length are the same in every row of a beam group and stay where they are."""
        layers = [dict(c, k=c["k"][src], v=c["v"][src]) for c in cache["layers"]]
        return {"layers": layers, "enc_len": cache["enc_len"]}

    def decode(self, params, tokens, positions, cache):
        return self.model.apply({"params": params}, tokens, positions, cache, method=T5.decode)

    def full_logits(self, params, enc_tokens, enc_len, dec_tokens, dec_len):
        return self.model.apply({"params": params}, enc_tokens, enc_len, dec_tokens, dec_len)
