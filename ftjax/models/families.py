"""How the engine drives each model family: the cache pytree, what prefill produces, how a prefix is
written into the cache, and one decode step. The engine is family-agnostic; it only sees these.

A family's cache is any pytree whose leaves have the slot dimension first (so rows can be written
at insert, reordered for beam search, and sharded by slot), created by `init_cache`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ftjax.models import gpt


def write_rows(dst, upd, src, slots, start=None):
    """Rows `src` [m] of `upd` [b, ...] into rows `slots` [m] of `dst` [B, ...] (slot >= B: dropped); upd's
    other dims may be shorter than dst's (a prompt's T <= the cache's S): it fills their leading part.
    start (a traced int, or None): the host has checked that slots = start + arange(m), src = arange(m) and
    m = b (no padding rows): then the write is one in-place dynamic_update_slice. XLA's scatter for the
    general case wrote a prefill's K/V at ~0.2 TB/s (bench/RESULTS.md, eighth session)."""
    upd = upd.astype(dst.dtype)
    if start is not None:
        return jax.lax.dynamic_update_slice(dst, upd, (start,) + (0,) * (dst.ndim - 1))
    idx = (slots,) + tuple(slice(0, n) for n in upd.shape[1:])
    return dst.at[idx].set(upd[src], mode="drop")


class GPTFamily:
    """Decoder-only: prefill runs the prompt, samples the first id and hands over the prompt's K/V."""

    samples_at_prefill = True

    def __init__(self, cfg, dtype, impl: str):
        self.cfg = cfg
        self.model = gpt.build(cfg, dtype, impl)
        self.dtype = dtype

    def init_cache(self, B: int, S: int) -> Any:
        c = self.cfg
        kv = (B, c.kv_heads, S, c.dim_per_head)
        return [{"k": jnp.zeros(kv, self.dtype), "v": jnp.zeros(kv, self.dtype)} for _ in range(c.num_layers)]

    # the prefill can write the prompt's K/V into the cache itself (`prefill(..., cache=, start=)`)
    writes_prefix_at_prefill = True

    def prefill(self, params, tokens, lengths, cache=None, start=None):
        """tokens [b, T]; lengths [b] -> (logits [b, v] at the last prompt id, prefix: per layer (k, v) [b, T, k, h]).
        With cache (the family's cache) and start (cache rows start .. start + b - 1 take the prompts): the
        layers write their K/V into it as they go, and the second result is the written cache."""
        if cache is None:
            return self.model.apply({"params": params}, tokens, lengths, method=gpt.GPT.prefill)
        logits, kv = self.model.apply({"params": params}, tokens, lengths, False,
                                      [(c["k"], c["v"]) for c in cache], start, method=gpt.GPT.prefill)
        return logits, [{"k": k, "v": v} for k, v in kv]

    def prefill_part(self, params, tokens, lengths, carry, lo: int, hi: int, last: bool, cache=None, start=None):
        """Layers [lo, hi) of `prefill` (see `gpt.GPT.prefill_part`): -> (carry or, with last, logits [b, v], kv),
        kv per layer lo .. hi - 1: (k, v) [b, T, k, h] as `prefill`'s, or with cache (those layers' caches) the
        written caches {"k", "v"}."""
        at = None if cache is None else [(c["k"], c["v"]) for c in cache]
        out, kv = self.model.apply({"params": params}, tokens, lengths, carry, lo, hi, last, False, at, start,
                                   method=gpt.GPT.prefill_part)
        return out, (kv if cache is None else [{"k": k, "v": v} for k, v in kv])

    @staticmethod
    def part_params(params, lo: int, hi: int, last: bool):
        """The params `prefill_part(lo, hi, last)` reads (a piece's call then flattens only those): the embedding
        for the first piece, layers lo .. hi - 1, and for the last the final norm and output head too."""
        def keep(k):
            if k.startswith("layers_"):
                return lo <= int(k[len("layers_"):]) < hi
            return last or (lo == 0 and k == "embed")
        return {k: v for k, v in params.items() if keep(k)}

    def write_prefix(self, cache, prefix, src, slots, start=None):
        """Copy prefix rows `src` [m] into cache rows `slots` [m] (slot >= B: dropped); `start`: see
        `write_rows`."""
        return [{"k": write_rows(layer["k"], jnp.swapaxes(k, 1, 2), src, slots, start),    # [b, k, T, h]
                 "v": write_rows(layer["v"], jnp.swapaxes(v, 1, 2), src, slots, start)}
                for layer, (k, v) in zip(cache, prefix)]

    def reorder(self, cache, src):
        """Beam search: row i continues row src[i] [B]."""
        return jax.tree.map(lambda a: a[src], cache)

    def decode(self, params, tokens, positions, cache):
        """tokens [B]; positions [B] -> (logits [B, v], cache)."""
        return self.model.apply({"params": params}, tokens, positions, cache, method=gpt.GPT.decode)

    def full_logits(self, params, tokens, lengths):
        logits, _ = self.model.apply({"params": params}, tokens, lengths, True, method=gpt.GPT.prefill)
        return logits


def family_for(cfg, dtype, impl: str):
    if getattr(cfg, "arch", "gpt") == "t5":
        from ftjax.models.t5 import T5Family

        return T5Family(cfg, dtype, impl)
    return GPTFamily(cfg, dtype, impl)
