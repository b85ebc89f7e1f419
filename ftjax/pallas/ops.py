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

On a tensor-parallel mesh. XLA's SPMD partitioner splits the "xla" einsums over heads by itself,
but a Pallas kernel is a custom call it cannot split: left alone it would all-gather q, K/V and
the cache onto every device and run the kernel on all heads. So "pallas" runs the kernel once per
shard, under `jax.shard_map` over the mesh axes the rule table (ftjax/sharding/rules.py) puts the
heads, kv heads and batch on: each device attends with its own heads and its own kv heads (and
its own rows, were the batch split), nothing is gathered. The mesh and the rule table come from
`ftjax.sharding.mesh.attention_mesh(mesh, rules)`, a context the layout enters while it traces a
step (`Layout.wrap_family`); without it the kernel runs on the whole arrays as before.
  * GQA/MQA with fewer kv heads than tensor ranks (the table replicates kv heads): every rank
    holds all kv heads and takes the one its q heads use (q head i uses kv head i // g). With
    k > 1 that is a dynamic slice, i.e. a copy of 1/k of the cache per layer and step (MQA, k = 1,
    copies nothing); a kernel reading the kv head in place would save it.
  * T5's relative-position bias [1|b, n, t, s] is split over heads like q.
  * Inside a shard_map that is already manual over some mesh axes (the pipeline stages of
    ftjax/sharding/pipeline*.py: manual over "pipeline", "tensor" left to XLA), the arrays are
    already local on those axes: the inner shard_map is manual over the remaining axes only, on
    the context's (abstract) mesh; when none remain the kernel runs directly on the local arrays.
  * A split dimension that the mesh axis does not divide runs whole on that axis (as before).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax.pallas import _common as C
from ftjax.sharding import rules as R
from ftjax.sharding.mesh import current_attention_mesh
from ftjax.pallas.decode_attention import decode_attention
from ftjax.pallas.prefill_attention import packed_kernel_writes_kv, prefill_attention, prefill_attention_packed

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


# ------------------------------------------------------------------- the kernels, one call per shard
# Logical axes of the kernels' arguments (rules.py names; None: never split).
_DECODE_Q = ("batch", "heads", "head_dim")                 # q, out [b, n, h]
_DECODE_KV = ("batch", "kv_heads", "seq", "head_dim")      # the cache [b, k, s, h]
_PREFILL_Q = ("batch", None, "heads", "head_dim")          # q, out [b, t, n, h]
_PREFILL_KV = ("batch", None, "kv_heads", "head_dim")      # k, v [b, s, k, h]
_LENGTHS = ("batch",)


@dataclasses.dataclass(frozen=True)
class _Shards:
  mesh: Any                      # concrete mesh (top level) or the context's abstract mesh
  rules: dict
  axes: frozenset                # mesh axes this call makes manual
  kv_select: tuple | None        # (heads axis, size): kv heads replicated over the axis heads are split on


def _shards(arrays) -> _Shards | None:
  """How the kernel runs on the current mesh; None: once, on the whole arrays. `arrays`: (logical
  axes, shape) of every argument."""
  ctx = current_attention_mesh()
  if ctx is None:
    return None
  mesh, rules = ctx
  manual = frozenset()
  amesh = jax.sharding.get_abstract_mesh()
  if not amesh.empty:                      # inside a shard_map (or a jax.set_mesh) on this mesh
    if tuple(amesh.axis_names) != tuple(mesh.axis_names) or dict(amesh.shape) != dict(mesh.shape):
      return None
    mesh, manual = amesh, frozenset(amesh.manual_axes)
  sizes = dict(mesh.shape)
  axes = set()
  for name in ("batch", "heads", "kv_heads"):
    a = rules.get(name)
    if a is None or a in manual or sizes.get(a, 1) == 1:
      continue
    # every dimension on this mesh axis must divide, else it stays whole (the kernel sees it all)
    if all(dim % sizes[a] == 0 for logical, shape in arrays for ln, dim in zip(logical, shape)
           if ln is not None and rules.get(ln) == a):
      axes.add(a)
  heads = rules.get("heads")
  kv_select = None
  if heads is not None and rules.get("kv_heads") != heads and (heads in axes or heads in manual):
    kv_select = (heads, sizes[heads])
  if not axes and kv_select is None:
    return None
  return _Shards(mesh, rules, frozenset(axes), kv_select)


def _own_kv_heads(x, dim: int, q_heads: int, axis: str, size: int):
  """x [..., k, ...] (all kv heads, at `dim`) -> the kv heads this rank's `q_heads` local query heads
  use: rank r holds q heads [r * q_heads, (r + 1) * q_heads), and q head i uses kv head i // g."""
  kh = x.shape[dim]
  n = q_heads * size
  assert n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  g = n // kh
  count = max(1, q_heads // g)
  if count == kh:
    return x
  assert (q_heads % g == 0) if q_heads >= g else (g % q_heads == 0), (
      f"{q_heads} query heads per rank and {g} query heads per kv head do not nest")
  start = jax.lax.axis_index(axis) * q_heads // g
  return jax.lax.dynamic_slice_in_dim(x, start, count, dim)


def _per_shard(kernel, args, arg_axes, out_axes, kv_args, q_heads_dim):
  """kernel(*args) on every shard of the current mesh (see the module docstring). args may hold
  None (an absent bias): passed through as None. kv_args: indices of the K/V arguments (kv heads at
  dim 1 for the cache, 2 for prefill's k/v: their logical axes say which)."""
  live = [i for i, a in enumerate(args) if a is not None]
  sh = _shards([(arg_axes[i], args[i].shape) for i in live])
  if sh is None:
    return kernel(*args)

  def body(*local):
    full = list(args)
    for i, a in zip(live, local):
      full[i] = a
    if sh.kv_select is not None:
      axis, size = sh.kv_select
      q_heads = full[0].shape[q_heads_dim]
      for i in kv_args:
        full[i] = _own_kv_heads(full[i], arg_axes[i].index("kv_heads"), q_heads, axis, size)
    return kernel(*full)

  if not sh.axes:   # every axis already manual: the arrays are local here
    return body(*[args[i] for i in live])
  in_specs = tuple(R.manual_spec(arg_axes[i], sh.rules, sh.axes) for i in live)
  out_specs = R.manual_spec(out_axes, sh.rules, sh.axes)
  return jax.shard_map(body, mesh=sh.mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=set(sh.axes), check_vma=False)(*[args[i] for i in live])


def attention_decode(q, k_cache, v_cache, lengths, *, impl: str, scale=None):
  """q [b, n, h]; k_cache, v_cache [b, k, s, h]; lengths [b] -> [b, n, h]."""
  _check_impl(impl)
  if impl == "xla":
    return xla_decode_attention(q, k_cache, v_cache, lengths, scale=scale)

  def kernel(q, k_cache, v_cache, lengths):
    return decode_attention(q, k_cache, v_cache, lengths, scale=scale,
                            interpret=C.default_interpret())

  return _per_shard(kernel, (q, k_cache, v_cache, lengths),
                    (_DECODE_Q, _DECODE_KV, _DECODE_KV, _LENGTHS), _DECODE_Q, kv_args=(1, 2),
                    q_heads_dim=1)


def attention_prefill(q, k, v, lengths, *, impl: str, causal=True, bias=None, scale=None):
  """q [b, t, n, h]; k, v [b, s, k, h]; lengths [b]; bias [1|b, n, t, s] -> [b, t, n, h]."""
  _check_impl(impl)
  if impl == "xla":
    return xla_prefill_attention(q, k, v, lengths, causal=causal, bias=bias, scale=scale)

  def kernel(q, k, v, lengths, bias):
    return prefill_attention(q, k, v, lengths, scale=scale, causal=causal, bias=bias,
                             interpret=C.default_interpret())

  bias_axes = (None if bias is None or bias.shape[0] == 1 else "batch", "heads", None, None)
  return _per_shard(kernel, (q, k, v, lengths, bias),
                    (_PREFILL_Q, _PREFILL_KV, _PREFILL_KV, _LENGTHS, bias_axes), _PREFILL_Q,
                    kv_args=(1, 2), q_heads_dim=2)


def attention_prefill_packed(qkv, num_heads: int, kv_heads: int, lengths, *, impl: str, scale=None,
                             cache=None, start=None):
  """Causal self-attention of a packed projection: qkv [b, t, n + 2k, h] (q heads, then K's kv heads, then
  V's); lengths [b] -> [b, t, n, h]. The Pallas kernel reads the three out of the packed array in place
  (`prefill_attention_packed`); the XLA impl, and a tensor-parallel mesh (whose head split the packing does
  not follow), split it and take `attention_prefill`.
  cache = (k_cache, v_cache) [B, k, S, h], start: the prompt's K/V also go into cache rows start .. start + b - 1
  (the Pallas kernel writes them itself where `kernel_writes_kv` holds, else `write_kv_into`)
  -> (out, k_cache, v_cache)."""
  _check_impl(impl)
  n, kh = num_heads, kv_heads
  xla = impl == "xla" or current_attention_mesh() is not None
  if cache is not None and (xla or not packed_kernel_writes_kv(qkv, n, cache[0])):
    out = attention_prefill_packed(qkv, n, kh, lengths, impl=impl, scale=scale)
    return (out, *write_kv_into(cache, qkv[:, :, n:n + kh], qkv[:, :, n + kh:], start))
  if xla:
    q, k, v = qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]
    return attention_prefill(q, k, v, lengths, impl=impl, causal=True, scale=scale)
  return prefill_attention_packed(qkv, lengths, num_heads=n, kv_heads=kh, scale=scale,
                                  interpret=C.default_interpret(), cache=cache, start=start)


def write_kv_into(cache, k, v, start):
  """k, v [b, t, k, h] into cache rows start .. start + b - 1 ([B, k, S, h] each), positions 0 .. t - 1: one
  in-place dynamic_update_slice per cache (the contiguous case of models/families.py `write_rows`)."""
  at = (jnp.asarray(start, jnp.int32), 0, 0, 0)
  return tuple(jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), at)
               for c, x in zip(cache, (k, v)))
