"""Attention entry points the model calls: XLA implementation or Pallas kernels, chosen by `impl`.

(Placeholder written by the engine author with the XLA paths only; the kernel author owns this file and
wires the Pallas kernels in.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def resolve_impl(attention: str) -> str:
    if attention == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if attention in ("pallas", "xla"):
        return attention
    raise ValueError(f"attention: unknown {attention!r}; expected 'auto', 'pallas' or 'xla'")


def attention_decode(q, k_cache, v_cache, lengths, *, impl: str, scale=None):
    """q [b, n, h]; k_cache, v_cache [b, k, s, h]; lengths [b] valid keys -> [b, n, h]."""
    if impl != "xla":
        raise NotImplementedError(f"attention impl {impl!r}")
    b, n, h = q.shape
    kh, s = k_cache.shape[1], k_cache.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.reshape(b, kh, n // kh, h)
    sc = jnp.einsum("bkgh,bksh->bkgs", qg, k_cache, preferred_element_type=jnp.float32) * scale
    mask = jnp.arange(s)[None, :] < lengths[:, None]  # [b, s]
    sc = jnp.where(mask[:, None, None, :], sc, _NEG)
    p = jax.nn.softmax(sc, axis=-1)
    out = jnp.einsum("bkgs,bksh->bkgh", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h).astype(q.dtype)


def attention_prefill(q, k, v, lengths, *, impl: str, causal=True, bias=None, scale=None):
    """q [b, t, n, h]; k, v [b, s, k, h]; lengths [b]; bias [1|b, n, t, s] -> [b, t, n, h]."""
    if impl != "xla":
        raise NotImplementedError(f"attention impl {impl!r}")
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, n // kh, h)
    sc = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        sc = sc + bias.reshape(bias.shape[0], kh, n // kh, t, s).astype(jnp.float32)
    mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, :]  # [b, 1, s]
    if causal:
        mask = mask & (jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None])
    sc = jnp.where(mask[:, None, None], sc, _NEG)
    p = jax.nn.softmax(sc, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
