"""The whole MLP of a small-M decode step in one kernel: input projection(s), activation, output projection.

    parts[p] = act(norm(x) @ W_in[:, F_p] * s_in + b_in) @ W_out[F_p, :]        p = 0 .. P-1

F_p is program p's slice of `block_f` hidden units. A program computes its slice of the hidden
activation completely (the input projection over all K = d, then bias, rounding to the model dtype and
the activation, in registers), then multiplies it by the matching rows of the output weight: its
[M, N] product is one split-K partial of the output projection. Nothing crosses programs, so the MLP is
one launch instead of three kernels (input projection, activation fusion, output projection: two
kernel boundaries of the decode step's critical path). The P partials are summed by the consumer (the
residual add + statistics kernel, `ftjax/pallas/add_norm.py`), with the output weight's scale (int8)
applied after the sum.

Shapes (M rows, K = d input features, F hidden units, N = d output features):
  x            [M, K]        bf16 / f16 / f32 (or normalised on the fly from `add_stats` statistics)
  w_ins[i]     [K, F] ([F, K] where trans_in[i]): 1 weight, or 2 for a gated MLP (up, gate:
               act(gate) * up)
  w_out        [F, N] ([N, F] where trans_out)
  scales_in[i] [F] or None (int8), biases_in[i] [F] or None
  parts        [P, M, N] float32, P = F / block_f

Semantics match `ftjax.layers.mlp.MLP.parts` with the XLA activation: each input projection is
accumulated in float32, scaled, biased, rounded to x's dtype, the activation applied in float32 and the
result rounded to x's dtype before the output product.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C
from ftjax.pallas.add_norm import mean_rstd, scale_shift
from ftjax.pallas.small_linear import ROWS, WEIGHT_DTYPES, _and, dequant_int8, resolve_dequant

ACTIVATIONS = ("gelu_tanh", "relu", "silu")       # those the Triton lowering has ("gelu" needs erf)


@dataclasses.dataclass(frozen=True)
class FusedMLPConfig:
  """block_f: hidden units per program (None: F / target_programs, a power of two >= 16);
  block_k / block_n: the input / output weight tiles' other side (None: 128 / 128)."""
  block_f: int | None = None
  block_k: int | None = None
  block_n: int | None = None
  target_programs: int = 128
  num_warps: int = 4
  num_stages: int = 3

  def resolve(self, F: int, K: int, N: int) -> "FusedMLPConfig":
    bf = self.block_f or max(16, min(256, pl.next_power_of_2(max(1, F // self.target_programs))))
    bk = self.block_k or min(128, max(16, pl.next_power_of_2(K)))
    bn = self.block_n or min(128, max(16, pl.next_power_of_2(N)))
    return dataclasses.replace(self, block_f=bf, block_k=bk, block_n=bn)


DEFAULT_CONFIG = FusedMLPConfig()


def _kernel(x_ref, *refs, M: int, K: int, F: int, N: int, bf: int, bk: int, bn: int, n_in: int,
            has_scale, has_bias, trans_in, trans_out: bool, act: str, norm, precision, dequant: str):
  it = iter(refs)
  w_refs = [next(it) for _ in range(n_in)]
  wo_ref = next(it)
  s_refs = [next(it) if has_scale[i] else None for i in range(n_in)]
  b_refs = [next(it) if has_bias[i] else None for i in range(n_in)]
  norm_refs = [next(it) for _ in range(3 if norm is not None and norm[3] else 2 if norm is not None else 0)]
  o_ref = next(it)
  cdtype = x_ref.dtype
  p = pl.program_id(0)
  zero = p * 0
  row0 = zero
  f0 = p * bf
  rmask = None if M == ROWS else (jnp.arange(ROWS) < M)[:, None]          # [16, 1]
  fmask = None if F % bf == 0 else (f0 + jnp.arange(bf)) < F              # [bf]

  if norm is not None:
    kind, eps, n_chunks, has_beta = norm
    st_ref, g_ref = norm_refs[:2]
    nb_ref = norm_refs[2] if has_beta else None
    cp = max(16, pl.next_power_of_2(n_chunks))
    smask = (jnp.arange(cp) < n_chunks)[None, :]
    smask = smask if rmask is None else smask & rmask

    def row_sum(i):
      t = C.load(st_ref.at[zero + i, pl.ds(row0, ROWS), pl.ds(zero, cp)], mask=smask, other=0)
      return jnp.sum(t, axis=1)

    mean, rstd = mean_rstd(row_sum(0) if kind == "layernorm" else None, row_sum(1), K, kind, eps)
    mean = None if mean is None else mean[:, None]
    rstd = rstd[:, None]

  def vec(ref, start, width, mask):                                       # [1, width] float32
    v = ref.at[pl.ds(start, width)]
    return (v[...] if mask is None else C.load(v, mask=mask, other=0)).astype(jnp.float32)[None, :]

  def w_tile(ref, t, r0, c0, rows, cols, rmask_, cmask_):
    """Tile [rows, cols] of the logical [R, C] weight (stored [C, R] when t), as cdtype, and t."""
    if t:
      s = ref.at[pl.ds(c0, cols), pl.ds(r0, rows)]
      m = _and(None if cmask_ is None else cmask_[:, None], None if rmask_ is None else rmask_[None, :])
    else:
      s = ref.at[pl.ds(r0, rows), pl.ds(c0, cols)]
      m = _and(None if rmask_ is None else rmask_[:, None], None if cmask_ is None else cmask_[None, :])
    wb = s[...] if m is None else C.load(s, mask=m, other=0)
    return dequant_int8(wb, cdtype, dequant) if wb.dtype == jnp.int8 else wb.astype(cdtype)

  ragged_k = K % bk != 0

  def body1(kb, accs):
    k0 = kb * bk
    kmask = ((k0 + jnp.arange(bk)) < K) if ragged_k else None
    xm = _and(rmask, None if kmask is None else kmask[None, :])
    xs = x_ref.at[pl.ds(row0, ROWS), pl.ds(k0, bk)]
    xb = xs[...] if xm is None else C.load(xs, mask=xm, other=0)         # [16, bk]
    if norm is not None:
      b = None if nb_ref is None else vec(nb_ref, k0, bk, kmask)
      xb = scale_shift(xb.astype(jnp.float32), mean, rstd, vec(g_ref, k0, bk, kmask), b).astype(cdtype)
    out = []
    for i in range(n_in):
      wb = w_tile(w_refs[i], trans_in[i], k0, f0, bk, bf, kmask, fmask)   # [bk, bf] / [bf, bk]
      out.append(accs[i] + C.dot(xb, wb, trans_b=trans_in[i], precision=precision))
    return tuple(out)

  nkb = pl.cdiv(K, bk)
  accs = jax.lax.fori_loop(0, nkb, body1, tuple(jnp.zeros((ROWS, bf), jnp.float32) for _ in range(n_in)))
  ys = []
  for i in range(n_in):
    y = accs[i]
    if s_refs[i] is not None:
      y = y * vec(s_refs[i], f0, bf, fmask)
    if b_refs[i] is not None:
      y = y + vec(b_refs[i], f0, bf, fmask)
    ys.append(y.astype(cdtype).astype(jnp.float32))                       # as the unfused path rounds
  from ftjax.layers.mlp import activation

  h = activation(act, ys[1]) * ys[0] if n_in == 2 else activation(act, ys[0])
  if fmask is not None:
    h = jnp.where(fmask[None, :], h, 0.0)
  h = h.astype(cdtype)                                                    # [16, bf]

  nmask_needed = N % bn != 0

  def body2(nb, carry):
    n0 = nb * bn
    nmask = ((n0 + jnp.arange(bn)) < N) if nmask_needed else None
    wb = w_tile(wo_ref, trans_out, f0, n0, bf, bn, fmask, nmask)          # [bf, bn] / [bn, bf]
    out = C.dot(h, wb, trans_b=trans_out, precision=precision)            # [16, bn]
    dst = o_ref.at[p, pl.ds(row0, ROWS), pl.ds(n0, bn)]
    om = _and(rmask, None if nmask is None else nmask[None, :])
    if om is None:
      dst[...] = out
    else:
      C.store(dst, out, mask=jnp.broadcast_to(om, (ROWS, bn)))
    return carry

  jax.lax.fori_loop(0, pl.cdiv(N, bn), body2, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("act", "trans_in", "trans_out", "config", "interpret", "kind", "eps"))
def _fused_mlp(x, w_ins, w_out, scales_in, biases_in, norm_args, *, act, trans_in, trans_out, config, interpret,
               kind, eps):
  M, K = x.shape
  F = w_ins[0].shape[0] if trans_in[0] else w_ins[0].shape[1]
  N = w_out.shape[0] if trans_out else w_out.shape[1]
  cfg = config.resolve(F, K, N)
  bf, bk, bn = cfg.block_f, cfg.block_k, cfg.block_n
  P = pl.cdiv(F, bf)
  norm = None
  if norm_args:
    norm = (kind, eps, int(norm_args[0].shape[2]), len(norm_args) == 3)
  wdtype = max([jnp.dtype(w.dtype) for w in (*w_ins, w_out)], key=lambda d: d.itemsize)
  stage = (len(w_ins) * bk * bf + bf * bn) * wdtype.itemsize + ROWS * bk * 4
  stages = max(1, min(cfg.num_stages, (192 * 1024) // stage))
  kernel = functools.partial(
      _kernel, M=M, K=K, F=F, N=N, bf=bf, bk=bk, bn=bn, n_in=len(w_ins),
      has_scale=tuple(s is not None for s in scales_in), has_bias=tuple(b is not None for b in biases_in),
      trans_in=trans_in, trans_out=trans_out, act=act, norm=norm, precision=C.dot_precision(x.dtype),
      dequant=resolve_dequant("auto", interpret))
  args = [x, *w_ins, w_out] + [s for s in scales_in if s is not None] + [b for b in biases_in if b is not None] \
      + list(norm_args)
  whole = lambda a: pl.BlockSpec(tuple(a.shape), lambda i: (0,) * len(a.shape))  # noqa: E731
  return pl.pallas_call(
      kernel,
      grid=(P,),
      in_specs=[whole(a) for a in args],
      out_specs=pl.BlockSpec((P, M, N), lambda i: (0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((P, M, N), jnp.float32),
      compiler_params=C.triton_compiler_params(cfg.num_warps, stages),
      interpret=interpret,
      name="ftjax_fused_mlp",
  )(*args)


def fused_mlp_parts(x, w_ins, w_out, *, act: str, scales_in=None, biases_in=None, trans_in=None,
                    trans_out: bool = False, norm=None, config: FusedMLPConfig | None = None,
                    interpret: bool = False):
  """-> parts [P, M, N] float32 whose sum over P is act(...) @ w_out (see the module docstring; the output
  weight's scale, if int8, is the caller's to apply after the sum). norm = (stats, gamma, beta, kind,
  eps) or None, as `small_linear_parts`' norm."""
  assert hasattr(x, "shape") and x.ndim == 2 and 1 <= x.shape[0] <= ROWS, (
      f"x must be [M, K] with M in 1..{ROWS}, got {getattr(x, 'shape', None)}")
  C.check_dtype("x", x)
  M, K = x.shape
  w_ins = list(w_ins)
  assert len(w_ins) in (1, 2), f"w_ins must be 1 weight (or 2: up, gate), got {len(w_ins)}"
  trans_in = tuple(bool(t) for t in (trans_in or (False,) * len(w_ins)))
  assert len(trans_in) == len(w_ins), "trans_in must align with w_ins"
  scales_in = list(scales_in or [None] * len(w_ins))
  biases_in = list(biases_in or [None] * len(w_ins))
  assert len(scales_in) == len(biases_in) == len(w_ins), "scales_in / biases_in must align with w_ins"
  assert act in ACTIVATIONS, f"act={act!r} is not one of {ACTIVATIONS}"
  Fs = set()
  for i, (w, t) in enumerate(zip(w_ins, trans_in)):
    assert w.ndim == 2 and jnp.dtype(w.dtype) in WEIGHT_DTYPES, f"w_ins[{i}]: 2-D weight, got {w.shape} {w.dtype}"
    k, f = (w.shape[1], w.shape[0]) if t else w.shape
    assert k == K, f"w_ins[{i}].shape={w.shape}: its K={k} != K={K} of x"
    Fs.add(f)
  assert len(Fs) == 1, f"w_ins have different hidden sizes {sorted(Fs)}"
  F = Fs.pop()
  f_out = w_out.shape[1] if trans_out else w_out.shape[0]
  assert w_out.ndim == 2 and f_out == F, f"w_out.shape={w_out.shape}: its hidden size {f_out} != F={F}"
  for i, (s, b) in enumerate(zip(scales_in, biases_in)):
    assert s is None or s.shape == (F,), f"scales_in[{i}] must be [F]=[{F}]"
    assert b is None or b.shape == (F,), f"biases_in[{i}] must be [F]=[{F}]"
  norm_args, kind, eps = (), None, None
  if norm is not None:
    stats, gamma, beta, kind, eps = norm
    norm_args = (stats, gamma) + (() if beta is None else (beta,))
    eps = float(eps)
  return _fused_mlp(x, tuple(w_ins), w_out, tuple(scales_in), tuple(biases_in), norm_args, act=act,
                    trans_in=trans_in, trans_out=bool(trans_out), config=config or DEFAULT_CONFIG,
                    interpret=bool(interpret), kind=kind, eps=eps)
