"""The one place the model calls attention: XLA or Pallas, chosen by `impl`.

  impl="xla":    production XLA attention: einsums in the input dtype with float32 accumulation
                 (`preferred_element_type`), float32 softmax, masking by lengths / causal / bias.
                 The fast non-kernel path, used on CPU and by `attention="xla"`.
  impl="pallas": the Pallas kernels of this package (Triton lowering). On a backend other than
                 GPU they run with `interpret=True`; they never fall back to XLA silently.
                 Every case of the API is served by the kernels, the T5 bias included.

`resolve_impl(attention)` maps the user-facing `ftjax.load(attention=...)` flag to an impl:
"auto" -> "pallas" on GPU, "xla" elsewhere; "pallas" / "xla" as given.

Shapes (b batch, t/s query/key length, n heads, k kv heads, h head_dim):
  decode:  q [b, n, h], k_cache / v_cache [b, k, s, h], lengths [b] -> [b, n, h]
  prefill: q [b, t, n, h], k / v [b, s, k, h], lengths [b], bias [1|b, n, t, s] -> [b, t, n, h]

Contents of the cache past a row's length must be finite for "xla" (the engine writes only
finite values and allocates the cache zeroed); the kernels mask them at load and accept
anything there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.pallas import _common as C
from ftjax.pallas.decode_attention import decode_attention
from ftjax.pallas.prefill_attention import prefill_attention

IMPLS = ("xla", "pallas")


def resolve_impl(attention: str) -> str:
  """"auto" -> "pallas" on GPU else "xla"; "pallas" / "xla" as given."""
  if attention == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if attention in IMPLS:
    return attention
  raise ValueError(
      f"attention={attention!r} is not one of 'auto', 'pallas', 'xla'")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS} (use resolve_impl for 'auto')")


def xla_decode_attention(q, k_cache, v_cache, lengths, *, scale=None):
  """XLA decode attention. q [b, n, h]; k_cache, v_cache [b, k, s, h]; lengths [b]."""
  b, n, h = q.shape
  _, kh, s, _ = k_cache.shape
  assert n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, kh, n // kh, h).astype(k_cache.dtype)
  logits = jnp.einsum("bkgh,bksh->bkgs", qg, k_cache,
                      preferred_element_type=jnp.float32) * scale
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)
  valid = jnp.arange(s)[None, :] < lengths[:, None]                     # [b, s]
  logits = jnp.where(valid[:, None, None, :], logits, C.MASK_VALUE)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bkgs,bksh->bkgh", p.astype(v_cache.dtype), v_cache,
                 preferred_element_type=jnp.float32)
  return o.reshape(b, n, h).astype(q.dtype)


def xla_prefill_attention(q, k, v, lengths, *, causal=True, bias=None, scale=None):
  """XLA prefill attention. q [b, t, n, h]; k, v [b, s, k, h]; lengths [b]; bias [1|b, n, t, s]."""
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  assert n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  scale = h ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, n // kh, h).astype(k.dtype)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kh, n // kh, t, s)
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)
  valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, None, :]
  if causal:
    valid = valid & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  logits = jnp.where(valid, logits, C.MASK_VALUE)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, h).astype(q.dtype)


def attention_decode(q, k_cache, v_cache, lengths, *, impl: str, scale=None):
  """q [b, n, h]; k_cache, v_cache [b, k, s, h]; lengths [b] -> [b, n, h]."""
  _check_impl(impl)
  if impl == "xla":
    return xla_decode_attention(q, k_cache, v_cache, lengths, scale=scale)
  return decode_attention(q, k_cache, v_cache, lengths, scale=scale,
                          interpret=C.default_interpret())


def attention_prefill(q, k, v, lengths, *, impl: str, causal=True, bias=None, scale=None):
  """q [b, t, n, h]; k, v [b, s, k, h]; lengths [b]; bias [1|b, n, t, s] -> [b, t, n, h]."""
  _check_impl(impl)
  if impl == "xla":
    return xla_prefill_attention(q, k, v, lengths, causal=causal, bias=bias, scale=scale)
  return prefill_attention(q, k, v, lengths, scale=scale, causal=causal, bias=bias,
                           interpret=C.default_interpret())
