"""Residual add + norm in one kernel, fed by a projection's split-K partials (the decode step) or by a
sub-block's output (prefill and wide decode steps: `parts` [1, M, D] in any float dtype).

In a batch-1..16 decode step every sub-block ends the same way: the projection's split-K partials
are summed, dequantised, biased and added to the residual stream, and the next norm's statistics
and output are computed from the result. As XLA fusions that is three small kernels (sum + bias +
add, the norm's statistics, the normalisation), each ~1.3-2 us of mostly latency on an H100, 4 to 6
per layer. This kernel does all of it in one launch:

  x       [M, D]            the residual stream (float dtype)
  parts   [S, M, D]         optional: split-K partials of the projection (S >= 1; float32), or a sub-block's
                            output ([1, M, D], any float dtype); None = nothing
  pscale  [D]               optional: per-output-channel scale of the partials' sum (int8 weights)
  pbias   [D]               optional: the projection's bias
  gamma   [D], beta [D]     the norm's scale and (LayerNorm only) bias
  ->  x_new [M, D] x.dtype  x + (sum_s parts[s]) * pscale + pbias, rounded to x.dtype
      h     [M, D] x.dtype  norm(x_new), computed in float32 from the rounded x_new

`kind` is "layernorm" (mean and variance) or "rmsnorm" (mean of squares), eps added to the variance,
exactly as `ftjax.layers.norms.Norm`. One program per row: it loads the row's partials (a static loop
over S, so every load is in flight at once), the residual and the parameters as [Dp] vectors (D padded
to a power of two by masked loads, nothing copied), and stores both outputs. Pallas' Triton lowering;
`interpret=True` runs the same body on CPU.

Outside the fused decode path the model runs `add_norm` for every residual add + norm of a prefill (or a
plain-path decode step) of at least `ftjax.models.gpt.NORM_KERNEL_MIN_ROWS` tokens (`NORM_KERNEL`), where XLA
compiles that pair to three kernels (the add with both reductions, the rsqrt, the normalisation reading the sum
again).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C

KINDS = ("layernorm", "rmsnorm")


def _loader(start, width: int, mask):
  """vec(ref, *lead) -> float32 [..., width]: ref's last axis at [start, start + width) after the
  indices `lead` (a 1-D ref takes none); `mask` [1, width] or None (loads past it read 0)."""
  def vec(ref, *lead):
    r = ref.at[(*lead, pl.ds(start, width))] if lead else ref.at[pl.ds(start, width)]
    m = None if mask is None else (mask if lead else mask[0])
    return C.load(r, mask=m, other=0).astype(jnp.float32)
  return vec


def _residual_sum(vec, x_ref, parts_ref, ps_ref, pb_ref, *, row, zero, S: int):
  """[1, width] float32: x + (sum_s parts[s]) * pscale + pbias of one row's slice (`vec` of `_loader`)."""
  x = vec(x_ref, pl.ds(row, 1))
  if S:
    acc = vec(parts_ref, zero, pl.ds(row, 1))
    for s in range(1, S):                                                 # static: all loads in flight
      acc = acc + vec(parts_ref, zero + s, pl.ds(row, 1))
    if ps_ref is not None:
      acc = acc * vec(ps_ref)[None, :]
    if pb_ref is not None:
      acc = acc + vec(pb_ref)[None, :]
    x = x + acc
  return x


def mean_rstd(s1, s2, D: int, kind: str, eps: float):
  """(mean or None, 1 / std) of rows from their float32 sum s1 and sum of squares s2 over D features,
  as `ftjax.layers.norms.Norm` computes them (variance E[x^2] - mean^2, clamped at 0; RMSNorm: no mean,
  s1 unused)."""
  if kind == "layernorm":
    mean = s1 / D
    return mean, jax.lax.rsqrt(jnp.maximum(s2 / D - mean * mean, 0.0) + eps)
  return None, jax.lax.rsqrt(s2 / D + eps)


def scale_shift(xf, mean, rstd, g, b):
  """(xf - mean) * rstd * g (+ b); mean None for RMSNorm, b None without a bias."""
  y = (xf if mean is None else xf - mean) * rstd * g
  return y if b is None else y + b


def _kernel(x_ref, *refs, D: int, S: int, kind: str, eps: float, has_scale: bool, has_bias: bool,
            has_beta: bool, pdl: bool = False):
  dep = C.grid_dependency(pdl)
  it = iter(refs)
  parts_ref = next(it) if S else None
  ps_ref = next(it) if has_scale else None
  pb_ref = next(it) if has_bias else None
  g_ref = next(it)
  b_ref = next(it) if has_beta else None
  xo_ref, h_ref = next(it), next(it)
  Dp = max(16, pl.next_power_of_2(D))
  row = pl.program_id(0) + dep
  # Traced zeros, not literals, as starts and indices: a [Dp] slice overruns a [D] ref on purpose
  # (masked), which a static start could be bounds-checked against (see small_linear.py).
  zero = row * 0
  mask = (jnp.arange(Dp) < D)[None, :] if Dp != D else None              # [1, Dp]
  vec = _loader(zero, Dp, mask)
  # [1, Dp] views: a row of a 2-D ref through a size-1 slice keeps every load/store 2-D
  x = _residual_sum(vec, x_ref, parts_ref, ps_ref, pb_ref, row=row, zero=zero, S=S)
  xr = x.astype(xo_ref.dtype)
  C.store(xo_ref.at[pl.ds(row, 1), pl.ds(zero, Dp)], xr, mask=mask)
  xf = xr.astype(jnp.float32)
  mean, rstd = mean_rstd(jnp.sum(xf, axis=1, keepdims=True), jnp.sum(xf * xf, axis=1, keepdims=True), D,
                         kind, eps)
  y = scale_shift(xf, mean, rstd, vec(g_ref)[None, :], vec(b_ref)[None, :] if has_beta else None)
  C.store(h_ref.at[pl.ds(row, 1), pl.ds(zero, Dp)], y.astype(h_ref.dtype), mask=mask)


def _check(x, parts, pscale, pbias, gamma, beta, kind, *, needs_gamma=True):
  assert hasattr(x, "shape") and x.ndim == 2, f"x must be [M, D], got shape {getattr(x, 'shape', None)}"
  M, D = x.shape
  assert M >= 1 and D >= 1, f"x.shape={x.shape}: M and D must be >= 1"
  C.check_dtype("x", x)
  assert kind in KINDS, f"kind={kind!r} is not one of {KINDS}"
  if parts is not None:
    assert parts.ndim == 3 and parts.shape[1:] == (M, D) and parts.shape[0] >= 1, (
        f"parts must be [S, M, D]=[S, {M}, {D}], got shape {parts.shape}")
  else:
    assert pscale is None and pbias is None, "pscale / pbias given without parts"
  for name, v in (("pscale", pscale), ("pbias", pbias), ("gamma", gamma), ("beta", beta)):
    if v is not None:
      assert v.shape == (D,), f"{name} must be [D]=[{D}], got shape {v.shape}"
  assert gamma is not None or not needs_gamma, "gamma (the norm's scale) is required"
  assert beta is None or kind == "layernorm", "beta is a LayerNorm parameter (kind='rmsnorm' has none)"


@functools.partial(jax.jit, static_argnames=("kind", "eps", "num_warps", "interpret"))
def add_norm(x, parts=None, pscale=None, pbias=None, *, gamma, beta=None, kind="layernorm", eps=1e-5,
             num_warps=None, interpret=False):
  """-> (x_new [M, D], h [M, D]) in x.dtype: x_new = x + sum(parts) * pscale + pbias, h = norm(x_new)."""
  _check(x, parts, pscale, pbias, gamma, beta, kind)
  M, D = x.shape
  S = 0 if parts is None else int(parts.shape[0])
  Dp = max(16, pl.next_power_of_2(D))
  warps = num_warps or (4 if Dp <= 1024 else 8 if Dp <= 4096 else 16)
  args = [x] + ([parts] if S else []) + [v for v in (pscale, pbias) if v is not None] + [gamma] \
      + ([beta] if beta is not None else [])
  whole = lambda a: pl.BlockSpec(tuple(a.shape), lambda i: (0,) * a.ndim)  # noqa: E731
  kernel = functools.partial(_kernel, D=D, S=S, kind=kind, eps=float(eps), has_scale=pscale is not None,
                             has_bias=pbias is not None, has_beta=beta is not None, pdl=C.pdl_on(interpret, M))
  out_shape = [jax.ShapeDtypeStruct((M, D), x.dtype)] * 2
  return tuple(pl.pallas_call(
      kernel,
      grid=(M,),
      in_specs=[whole(a) for a in args],
      out_specs=[pl.BlockSpec((M, D), lambda i: (0, 0))] * 2,
      out_shape=out_shape,
      compiler_params=C.triton_compiler_params(warps, 1),
      interpret=interpret,
      name="ftjax_add_norm",
  )(*args))


def add_norm_reference(x, parts=None, pscale=None, pbias=None, *, gamma, beta=None, kind="layernorm",
                       eps=1e-5):
  """Float32 plain-jnp twin of `add_norm` (same arguments and outputs)."""
  _check(x, parts, pscale, pbias, gamma, beta, kind)
  xf = x.astype(jnp.float32)
  if parts is not None:
    acc = jnp.sum(parts.astype(jnp.float32), axis=0)
    if pscale is not None:
      acc = acc * pscale.astype(jnp.float32)
    if pbias is not None:
      acc = acc + pbias.astype(jnp.float32)
    xf = xf + acc
  xr = xf.astype(x.dtype)
  xf = xr.astype(jnp.float32)
  if kind == "layernorm":
    mean = xf.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) / jnp.sqrt(var + eps) * gamma.astype(jnp.float32)
    if beta is not None:
      y = y + beta.astype(jnp.float32)
  else:
    y = xf / jnp.sqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * gamma.astype(jnp.float32)
  return xr, y.astype(x.dtype)


# ------------------------------------------------- add + row statistics; the norm itself in the consumer
# `add_norm` runs one program per row: at batch 1 a single SM reads every partial (S x D float32, 128 KB
# for GPT 1.3B's MLP output), ~4.4 us on an H100. `add_stats` spreads the same sum over column chunks
# (grid M x C) and stops before the norm: each program writes its chunk of x_new and the chunk's sum and
# sum of squares. The next projection normalises its input tiles itself (`small_linear_parts(norm=...)`:
# mean and 1/std from the C partial statistics of each row, then gamma and beta), so the norm costs no
# kernel of its own.


def _stats_kernel(x_ref, *refs, D: int, S: int, chunk: int, has_scale: bool, has_bias: bool,
                  pdl: bool = False):
  dep = C.grid_dependency(pdl)
  it = iter(refs)
  parts_ref = next(it) if S else None
  ps_ref = next(it) if has_scale else None
  pb_ref = next(it) if has_bias else None
  xo_ref, st_ref = next(it), next(it)
  row, c = pl.program_id(0) + dep, pl.program_id(1) + dep
  zero = row * 0
  c0 = c * chunk
  cmask = (c0 + jnp.arange(chunk)) < D
  mask = None if D % chunk == 0 else cmask[None, :]                       # [1, chunk]
  vec = _loader(c0, chunk, mask)
  x = _residual_sum(vec, x_ref, parts_ref, ps_ref, pb_ref, row=row, zero=zero, S=S)   # [1, chunk]
  xr = x.astype(xo_ref.dtype)
  C.store(xo_ref.at[pl.ds(row, 1), pl.ds(c0, chunk)], xr, mask=mask)
  xf = jnp.where(cmask[None, :], xr.astype(jnp.float32), 0.0)
  s1 = jnp.sum(xf, axis=1)                                                # [1]
  s2 = jnp.sum(xf * xf, axis=1)
  C.store(st_ref.at[zero, pl.ds(row, 1), pl.ds(c, 1)], s1[:, None])
  C.store(st_ref.at[zero + 1, pl.ds(row, 1), pl.ds(c, 1)], s2[:, None])


def stats_chunk(D: int) -> int:
  """Columns per program of `add_stats`: 128, or wider so that a row has at most 32 chunks."""
  return max(128, pl.next_power_of_2(pl.cdiv(D, 32)))


@functools.partial(jax.jit, static_argnames=("interpret",))
def add_stats(x, parts=None, pscale=None, pbias=None, *, interpret=False):
  """-> (x_new [M, D] x.dtype, stats [2, M, C] float32): x_new as `add_norm`'s, stats[0 / 1][m, c] the sum
  / sum of squares of row m's chunk c of x_new (as rounded), C = cdiv(D, stats_chunk(D))."""
  _check(x, parts, pscale, pbias, None, None, "rmsnorm", needs_gamma=False)
  M, D = x.shape
  S = 0 if parts is None else int(parts.shape[0])
  chunk = stats_chunk(D)
  nc = pl.cdiv(D, chunk)
  args = [x] + ([parts] if S else []) + [v for v in (pscale, pbias) if v is not None]
  whole = lambda a: pl.BlockSpec(tuple(a.shape), lambda i, j: (0,) * a.ndim)  # noqa: E731
  kernel = functools.partial(_stats_kernel, D=D, S=S, chunk=chunk, has_scale=pscale is not None,
                             has_bias=pbias is not None, pdl=C.pdl_on(interpret, M))
  return tuple(pl.pallas_call(
      kernel,
      grid=(M, nc),
      in_specs=[whole(a) for a in args],
      out_specs=[pl.BlockSpec((M, D), lambda i, j: (0, 0)), pl.BlockSpec((2, M, nc), lambda i, j: (0, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((M, D), x.dtype), jax.ShapeDtypeStruct((2, M, nc), jnp.float32)],
      compiler_params=C.triton_compiler_params(4 if chunk <= 512 else 8, 1),
      interpret=interpret,
      name="ftjax_add_stats",
  )(*args))


def norm_from_stats(x, stats, gamma, beta=None, *, kind="layernorm", eps=1e-5):
  """Plain jnp: norm(x) in x.dtype from `add_stats`' statistics (what a consumer kernel computes per tile)."""
  D = x.shape[-1]
  mean, rstd = mean_rstd(jnp.sum(stats[0], axis=-1, keepdims=True), jnp.sum(stats[1], axis=-1, keepdims=True),
                         D, kind, eps)
  y = scale_shift(x.astype(jnp.float32), mean, rstd, gamma.astype(jnp.float32),
                   None if beta is None else beta.astype(jnp.float32))
  return y.astype(x.dtype)


def _normalise_kernel(x_ref, st_ref, g_ref, *refs, D: int, n_chunks: int, chunk: int, kind: str, eps: float,
                      has_beta: bool, pdl: bool = False):
  dep = C.grid_dependency(pdl)
  b_ref = refs[0] if has_beta else None
  h_ref = refs[-1]
  row, c = pl.program_id(0) + dep, pl.program_id(1) + dep
  zero = row * 0
  cp = max(16, pl.next_power_of_2(n_chunks))
  smask = (jnp.arange(cp) < n_chunks)[None, :]
  s1 = jnp.sum(C.load(st_ref.at[zero, pl.ds(row, 1), pl.ds(zero, cp)], mask=smask, other=0), axis=1)   # [1]
  s2 = jnp.sum(C.load(st_ref.at[zero + 1, pl.ds(row, 1), pl.ds(zero, cp)], mask=smask, other=0), axis=1)
  c0 = c * chunk
  mask = None if D % chunk == 0 else ((c0 + jnp.arange(chunk)) < D)[None, :]
  vec = _loader(c0, chunk, mask)
  mean, rstd = mean_rstd(s1[:, None], s2[:, None], D, kind, eps)          # [1, 1]
  y = scale_shift(vec(x_ref, pl.ds(row, 1)), mean, rstd, vec(g_ref)[None, :],
                   vec(b_ref)[None, :] if has_beta else None)
  C.store(h_ref.at[pl.ds(row, 1), pl.ds(c0, chunk)], y.astype(h_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "interpret"))
def normalise(x, stats, gamma, beta=None, *, kind="layernorm", eps=1e-5, interpret=False):
  """norm(x) [M, D] in x.dtype from `add_stats`' statistics, one program per (row, column chunk): the
  second half of `add_norm` spread over the GPU (`norm_from_stats` is its plain-jnp twin)."""
  M, D = x.shape
  assert stats.ndim == 3 and stats.shape[:2] == (2, M), f"stats must be [2, M={M}, C], got {stats.shape}"
  assert gamma.shape == (D,) and (beta is None or beta.shape == (D,)), "gamma / beta must be [D]"
  assert kind in KINDS and (beta is None or kind == "layernorm"), f"kind={kind!r} / beta mismatch"
  chunk = stats_chunk(D)
  nc = pl.cdiv(D, chunk)
  args = [x, stats, gamma] + ([beta] if beta is not None else [])
  whole = lambda a: pl.BlockSpec(tuple(a.shape), lambda i, j: (0,) * a.ndim)  # noqa: E731
  kernel = functools.partial(_normalise_kernel, D=D, n_chunks=int(stats.shape[2]), chunk=chunk, kind=kind,
                             eps=float(eps), has_beta=beta is not None, pdl=C.pdl_on(interpret, M))
  return pl.pallas_call(
      kernel,
      grid=(M, nc),
      in_specs=[whole(a) for a in args],
      out_specs=pl.BlockSpec((M, D), lambda i, j: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((M, D), x.dtype),
      compiler_params=C.triton_compiler_params(4 if chunk <= 512 else 8, 1),
      interpret=interpret,
      name="ftjax_normalise",
  )(*args)
