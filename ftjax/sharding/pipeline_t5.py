"""Pipeline parallel for T5: encoder and decoder layers each in P contiguous stage blocks.

As `PipelinedGPT` (pipeline.py), the model is not changed (DESIGN.md convention 8): `PipelinedT5` drives
the same Flax modules from outside — the embedding, `t5.RelBias`, one `t5.EncoderLayer` /
`t5.DecoderLayer` per layer, the final norms and logits — and implements the T5 family interface
(`init_cache`, `prefill`, `write_prefix`, `reorder`, `decode`, `full_logits`).

Params are restacked per stage: {"embed", ["lm_head"], "encoder": {"rel_bias", "final_norm",
"stages": [Le/P]}, "decoder": {"rel_bias", "final_norm", "stages": [Ld/P]}}, each stages[j] with leaves
[P, ...] and logical axes ("stage", ...) as GPT's (stage s holds encoder layers s*Le/P .. and decoder
layers s*Ld/P ..). The relative-bias tables, final norms, embedding and logits are computed by every
stage group (the bias of every head is needed by every stage).

Cache: {"layers": list over a stage's local decoder layers j of {"k", "v", "ck", "cv"} [B, P, n, S, h],
"enc_len": [B] replicated}: each stage keeps the self K/V and the cross K/V of its own decoder layers.

Prefill: the encoder runs through the stages on micro-batches (PipelinedGPT's schedule: ppermute between
stages, the last stage's output psum'd over `pipeline` so every stage group has it); after the encoder's
final norm, every decoder stage computes the cross K/V of its own layers from that output (no
communication). Decode: the decoder activations go stage to stage on micro-batches like GPT's decode.
Beam reorder moves only the self K/V rows (as T5Family.reorder). `full_logits` pipelines the encoder,
then the decoder over the whole decoder sequence, each stage computing its layers' cross K/V in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.layers.norms import Norm
from ftjax.models import t5
from ftjax.models.families import write_rows
from ftjax.sharding import pipeline as PP
from ftjax.sharding import rules as R

PARTS = ("encoder", "decoder")


def part_layers(cfg) -> dict[str, int]:
    return {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}


def stack_params(params, cfg, pipeline: int):
    """Host (numpy) restack of the encoder's and the decoder's layers_i (PP.stack_params on each)."""
    out = dict(params)
    for part, L in part_layers(cfg).items():
        out[part] = PP.stack_params(params[part], L, pipeline)
    return out


def stack_axes(axes, cfg, pipeline: int):
    out = dict(axes)
    for part, L in part_layers(cfg).items():
        out[part] = PP.stack_axes(axes[part], L, pipeline)
    return out


def is_stacked(params) -> bool:
    return "stages" in params.get("encoder", {})


class PipelinedT5:
    """T5 family on P pipeline stages (see the module docstring)."""

    samples_at_prefill = False

    _ticks = PP.PipelinedGPT._ticks
    _shard_map = PP.PipelinedGPT._shard_map

    def __init__(self, base, mesh, rules):
        self.base, self.cfg, self.dtype = base, base.cfg, base.dtype
        self.model = base.model
        self.mesh, self.rules = mesh, rules
        self.P = mesh.shape[R.PIPELINE]
        c, impl = self.cfg, base.model.impl
        # Megatron-LM T5 options (LayerNorm, learned positions, LM-head bias) are not staged yet.
        unsupported = [f"{k}={getattr(c, k)!r}" for k, ok in (("norm", "rmsnorm"), ("position", "relative"),
                                                              ("lm_head_bias", False)) if getattr(c, k) != ok]
        if unsupported:
            raise ValueError(f"pipeline_parallel={self.P}: a T5 with {', '.join(unsupported)} (Megatron-LM T5) "
                             "runs with pipeline_parallel=1 in this build (tensor parallel works)")
        self.Le = c.num_encoder_layers // self.P
        self.Ld = c.num_decoder_layers // self.P
        self.enc_layer = t5.EncoderLayer(c, base.dtype, impl)
        self.dec_layer = t5.DecoderLayer(c, base.dtype, impl)
        self.norm = Norm(c.hidden, "rmsnorm", c.norm_eps, base.dtype)

    # ------------------------------------------------------------------ pieces of the model, outside
    def _embed(self, params, tokens):  # [...] -> [..., d]
        return self.model.apply({"params": {"embed": params["embed"]}}, tokens,
                                method=lambda m, t: m.embed(t, jnp.zeros_like(t)))

    def _head(self, params, part, h):  # decoder final norm, then logits
        h = self.norm.apply({"params": params[part]["final_norm"]}, h)
        keep = {k: params[k] for k in ("embed", "lm_head") if k in params}
        return self.model.apply({"params": keep}, h, method=lambda m, h: m.logits(h))

    def _bias(self, params, part, q_pos, k_pos):  # -> [..., n, t, s] f32
        return t5.RelBias(self.cfg, part == "encoder").apply({"params": params[part]["rel_bias"]}, q_pos, k_pos)

    def _pspec(self, params, part):
        return jax.tree.map(lambda _: R.stage_spec(self.rules), params[part]["stages"])

    # ----------------------------------------------------------------------------------- the stages
    def _stages_encode(self, params, x, bias, lengths):
        """x [b, T, d]; bias [1, n, T, T]; lengths [b] -> h [b, T, d] after the last encoder layer."""
        b, T, d = x.shape
        M = PP.micro_batches(b, self.P)
        mb = b // M

        def fn(stages, x, bias, lengths):
            stages = jax.tree.map(lambda a: a[0], stages)
            lm = lengths.reshape(M, mb)

            def step(carry, h, m, valid):
                ln = jax.lax.dynamic_index_in_dim(lm, m, 0, False)
                for lp in stages:
                    h = self.enc_layer.apply({"params": lp}, h, bias, ln)
                return carry, h

            _, out = self._ticks(M, step, ((), jnp.zeros((mb, T, d), x.dtype), x.reshape(M, mb, T, d)))
            return out.reshape(b, T, d)

        rep = R.manual_replicated()
        return self._shard_map(fn, (self._pspec(params, "encoder"), rep, rep, rep), rep)(
            params["encoder"]["stages"], x, bias, lengths)

    def _encode(self, params, tokens, lengths):
        """tokens [b, T]; lengths [b] -> encoder output [b, T, d] (after its final norm)."""
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        bias = self._bias(params, "encoder", pos, pos)[None]                  # [1, n, T, T]
        h = self._stages_encode(params, self._embed(params, tokens), bias, lengths)
        return self.norm.apply({"params": params["encoder"]["final_norm"]}, h)

    def _cross_kv(self, params, enc):
        """enc [b, T, d] -> list j of (ck, cv) [b, P, T, n, h]: each stage its own decoder layers'."""
        def fn(stages, enc):
            stages = jax.tree.map(lambda a: a[0], stages)
            out = []
            for lp in stages:
                ck, cv = self.dec_layer.apply({"params": lp}, enc, method=t5.DecoderLayer.cross_kv)
                out.append((ck[:, None], cv[:, None]))
            return out

        spec = [(R.batch_stage_spec(self.rules),) * 2 for _ in range(self.Ld)]
        return self._shard_map(fn, (self._pspec(params, "decoder"), R.manual_replicated()), spec)(
            params["decoder"]["stages"], enc)

    def _stages_decode(self, params, x, positions, bias, cache):
        """x [B, d]; positions [B]; bias [B, n, S]; cache as init_cache -> (h [B, d], cache)."""
        B, d = x.shape
        S = cache["layers"][0]["k"].shape[3]
        M = PP.micro_batches(B, self.P)
        mb = B // M
        cspec = jax.tree.map(lambda _: R.batch_stage_spec(self.rules), cache["layers"])
        rep = R.manual_replicated()

        def fn(stages, x, positions, bias, enc_len, layers):
            stages = jax.tree.map(lambda a: a[0], stages)
            layers = jax.tree.map(lambda a: a[:, 0], layers)                  # [B, n, S, h]
            pm, em = positions.reshape(M, mb), enc_len.reshape(M, mb)
            bm = bias.reshape((M, mb) + bias.shape[1:])
            at = lambda a, m: jax.lax.dynamic_index_in_dim(a, m, 0, False)  # noqa: E731

            def step(layers, h, m, valid):
                pos = jnp.where(valid, at(pm, m), S)                             # S: write dropped
                bs, el = at(bm, m), at(em, m)
                new = []
                for lp, cl in zip(stages, layers):
                    c = {k: jax.lax.dynamic_slice_in_dim(a, m * mb, mb, 0) for k, a in cl.items()}
                    h, c = self.dec_layer.apply({"params": lp}, h, pos, bs, c, el, method=t5.DecoderLayer.step)
                    new.append(dict(cl, k=jax.lax.dynamic_update_slice_in_dim(cl["k"], c["k"], m * mb, 0),
                                    v=jax.lax.dynamic_update_slice_in_dim(cl["v"], c["v"], m * mb, 0)))
                return new, h

            layers, out = self._ticks(M, step, (layers, jnp.zeros((mb, d), x.dtype), x.reshape(M, mb, d)))
            return out.reshape(B, d), jax.tree.map(lambda a: a[:, None], layers)

        h, layers = self._shard_map(fn, (self._pspec(params, "decoder"), rep, rep, rep, rep, cspec), (rep, cspec))(
            params["decoder"]["stages"], x, positions, bias, cache["enc_len"], cache["layers"])
        return h, {"layers": layers, "enc_len": cache["enc_len"]}

    def _stages_full(self, params, x, bias, dec_len, enc, enc_len):
        """Whole decoder sequence. x [b, t, d]; bias [1, n, t, t]; enc [b, s, d] -> h [b, t, d]."""
        b, t, d = x.shape
        M = PP.micro_batches(b, self.P)
        mb = b // M
        rep = R.manual_replicated()

        def fn(stages, x, bias, dec_len, enc, enc_len):
            stages = jax.tree.map(lambda a: a[0], stages)
            at = lambda a, m: jax.lax.dynamic_index_in_dim(a.reshape((M, mb) + a.shape[1:]), m, 0, False)  # noqa: E731

            def step(carry, h, m, valid):
                e, el, dl = at(enc, m), at(enc_len, m), at(dec_len, m)
                for lp in stages:
                    ck, cv = self.dec_layer.apply({"params": lp}, e, method=t5.DecoderLayer.cross_kv)
                    h = self.dec_layer.apply({"params": lp}, h, bias, dl, ck, cv, el, method=t5.DecoderLayer.full)
                return carry, h

            _, out = self._ticks(M, step, ((), jnp.zeros((mb, t, d), x.dtype), x.reshape(M, mb, t, d)))
            return out.reshape(b, t, d)

        return self._shard_map(fn, (self._pspec(params, "decoder"),) + (rep,) * 5, rep)(
            params["decoder"]["stages"], x, bias, dec_len, enc, enc_len)

    # ------------------------------------------------------------------------------ family interface
    def init_cache(self, B: int, S: int):
        c = self.cfg
        shape = (B, self.P, c.num_heads, S, c.head_dim)
        z = lambda: jnp.zeros(shape, self.dtype)  # noqa: E731
        return {"layers": [{"k": z(), "v": z(), "ck": z(), "cv": z()} for _ in range(self.Ld)],
                "enc_len": jnp.ones((B,), jnp.int32)}

    def prefill(self, params, tokens, lengths):
        """tokens [b, T]; lengths [b] -> (None, {"cross": list j of (ck, cv) [b, P, T, n, h], "enc_len"})."""
        enc = self._encode(params, tokens, lengths)
        return None, {"cross": self._cross_kv(params, enc), "enc_len": lengths}

    def write_prefix(self, cache, prefix, src, slots, start=None):
        layers = []
        for layer, (ck, cv) in zip(cache["layers"], prefix["cross"]):     # [b, P, T, n, h] -> [b, P, n, T, h]
            layers.append(dict(layer, ck=write_rows(layer["ck"], jnp.moveaxis(ck, 2, 3), src, slots, start),
                               cv=write_rows(layer["cv"], jnp.moveaxis(cv, 2, 3), src, slots, start)))
        enc_len = write_rows(cache["enc_len"], prefix["enc_len"], src, slots, start)
        return {"layers": layers, "enc_len": enc_len}

    def reorder(self, cache, src):
        """Beam search: only the self K/V rows move (each stage its own); cross K/V and enc_len stay."""
        layers = [dict(c, k=c["k"][src], v=c["v"][src]) for c in cache["layers"]]
        return {"layers": layers, "enc_len": cache["enc_len"]}

    def decode(self, params, tokens, positions, cache):
        """tokens [B]; positions [B] -> (logits [B, v], cache)."""
        S = cache["layers"][0]["k"].shape[3]
        bias = self._bias(params, "decoder", positions[:, None], jnp.arange(S, dtype=jnp.int32)[None, :])[:, :, 0]
        h, cache = self._stages_decode(params, self._embed(params, tokens), positions, bias, cache)
        return self._head(params, "decoder", h), cache

    def full_logits(self, params, enc_tokens, enc_len, dec_tokens, dec_len):
        """-> logits [b, t_dec, v] (teacher forcing)."""
        enc = self._encode(params, enc_tokens, enc_len)
        pos = jnp.arange(dec_tokens.shape[1], dtype=jnp.int32)
        bias = self._bias(params, "decoder", pos, pos)[None]
        h = self._stages_full(params, self._embed(params, dec_tokens), bias, dec_len, enc, enc_len)
        return self._head(params, "decoder", h)
