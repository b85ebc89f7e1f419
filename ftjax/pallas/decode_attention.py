"""Decode attention: one new query token per sequence against the K/V cache (flash-decoding).

Shapes (letter legend: b batch, n heads, k kv heads, g = n // k query heads per kv head,
s cache capacity, h head_dim):
  q        [b, n, h]      the new token's queries
  k_cache  [b, k, s, h]   the engine's cache layout, read in place (no transpose, no copy)
  v_cache  [b, k, s, h]
  lengths  [b] int32      valid keys per row, 1..s (clamped into that range)
  out      [b, n, h]      q.dtype, float32 softmax and accumulation

Algorithm. One Pallas program per (row b, kv head, split). The row's valid keys
`[0, lengths[b])` are cut into `num_splits` contiguous runs of `block_k`-key blocks (split-K,
"flash-decoding"), so a small batch still puts hundreds of programs on the GPU and only the
valid part of the cache is read. Each program streams its K and V blocks once, keeps an online
softmax (running max `m`, running sum `l`, unnormalised output `o`) in float32 registers, and
either writes the normalised output (one split) or its partial `(o, m, l)`; a small XLA
reduction merges the splits (it reads b*n*splits*h floats, negligible next to the cache).
All g query heads that share a kv head are handled by the same program, so each K/V byte is
read once for MHA, GQA and MQA alike:
  * g == 1 (MHA): q.K and p.V are vector products on the CUDA cores (a 16-row tensor-core tile
    would be 15/16 padding);
  * g > 1 (GQA/MQA): the g query rows (padded to 16, the smallest tensor-core tile) go through
    the Triton dot against the [block_k, h] K block, and the probabilities through it with V.
Keys past a row's length are masked at load (`other=0`), so stale or NaN cache contents past
the length never reach the output. head_dim that is not a power of two (80, 96) is padded to
the next power of two by masked loads: the cache is never copied. A cache capacity that is not
a multiple of 16 is the one case that pads (copies) the cache; the engine allocates multiples.

Lowering: Pallas' Triton lowering (`CompilerParams` of `jax.experimental.pallas.triton`,
passed explicitly). Decode is a memory-bound stream with tiny matrix products (16 rows at
most), so Hopper's wgmma (Mosaic GPU only) buys nothing here, while the Triton lowering is
interpretable on CPU with `interpret=True` in jax 0.10 and 0.11: the kernel CI tests is the
kernel the GPU runs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Tunables of the decode kernel.

  block_k: keys per loop step (a power of two >= 16; lowered to a divisor of the capacity).
  num_splits: split-K factor; None picks one so that b * k * splits fills the GPU
    (`target_programs`) while each split keeps at least `min_blocks_per_split` blocks.
  num_warps, num_stages: Triton launch / software-pipelining depth.
  small_head_warps: the append kernel's warps where head_dim <= 64 (None: num_warps). Measured on an H100
    (bench/RESULTS.md, twenty-third session): 2 warps took GPT 350M's decode step (head_dim 64) 0.73 ->
    0.69 ms at batch 1 and 1.32 -> 1.26 ms at batch 64, and made 1.3B's (head_dim 128) 2.5-4% slower.
  block_k / num_stages None: the defaults tuned on an H100 (bench/RESULTS.md), per path:
    MHA vector path block_k=128, num_stages=2; GQA/MQA dot path block_k=64, num_stages=4.
  """
  block_k: int | None = None
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int | None = None
  target_programs: int = 528          # 4 waves of programs on a 132-SM H100
  min_blocks_per_split: int = 2
  max_splits: int = 64
  mha_dot: bool = False               # g == 1: use the padded 16-row tensor-core path too
  small_head_warps: int | None = None

  def __post_init__(self):
    assert self.block_k is None or (self.block_k >= 16 and self.block_k & (self.block_k - 1) == 0), (
        f"DecodeConfig.block_k={self.block_k} must be a power of two >= 16")
    assert self.num_splits is None or self.num_splits >= 1, (
        f"DecodeConfig.num_splits={self.num_splits} must be >= 1 or None")
    assert self.num_warps in (1, 2, 4, 8, 16), f"DecodeConfig.num_warps={self.num_warps}"
    assert self.small_head_warps in (None, 1, 2, 4, 8, 16), f"DecodeConfig.small_head_warps={self.small_head_warps}"
    assert self.num_stages is None or self.num_stages >= 1, (
        f"DecodeConfig.num_stages={self.num_stages}")

  def warps(self, head_dim: int) -> int:
    """Warps of the append kernel for this head_dim."""
    return self.small_head_warps if self.small_head_warps and head_dim <= 64 else self.num_warps

  def resolve(self, use_dot: bool, hp: int) -> tuple[int, int]:
    """(block_k, num_stages) for the path taken and the padded head_dim."""
    block_k = self.block_k or (64 if use_dot else 128)
    num_stages = self.num_stages or (4 if use_dot else 2)
    return (min(block_k, 64) if hp > 128 else block_k), num_stages


def _block_k_for(capacity: int, block_k: int) -> int:
  """Largest power of two <= block_k (and >= 16) dividing the capacity; 0 if none."""
  bk = block_k
  while bk >= 16:
    if capacity % bk == 0:
      return bk
    bk //= 2
  return 0


def choose_num_splits(config: DecodeConfig, batch: int, kv_heads: int, capacity: int,
                      block_k: int) -> int:
  n_blocks = pl.cdiv(capacity, block_k)
  if config.num_splits is not None:
    return max(1, min(config.num_splits, n_blocks))
  want = pl.cdiv(config.target_programs, batch * kv_heads)
  cap = max(1, n_blocks // config.min_blocks_per_split)
  return max(1, min(want, cap, config.max_splits))


def _split_range(length, block_k: int, num_splits: int):
  """Block range [lo, hi) of this program's split of the row's valid blocks."""
  n_blocks = pl.cdiv(length, block_k)
  if num_splits == 1:
    return 0, n_blocks
  per_split = pl.cdiv(n_blocks, num_splits)
  lo = pl.program_id(2) * per_split
  hi = jnp.minimum(lo + per_split, n_blocks)
  return lo, jnp.maximum(hi, lo)


def _write(out_refs, o, m, l, *, num_splits: int):
  if num_splits == 1:
    (o_ref,) = out_refs
    # l >= 1 for any program with a valid key (lengths >= 1); guard anyway.
    inv = 1.0 / jnp.maximum(l, 1e-30)
    if o.ndim == 2:
      inv = inv[:, None]
    o_ref[...] = (o * inv).astype(o_ref.dtype)
  else:
    o_ref, m_ref, l_ref = out_refs
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _kernel_vec(len_ref, q_ref, k_ref, v_ref, *out_refs, qk_scale: float, block_k: int,
                head_dim: int, num_splits: int, pdl: bool = False):
  """g == 1. q_ref [hp]; k_ref, v_ref [s, hp]; out o [hp] (+ m, l scalars)."""
  dep = C.grid_dependency(pdl)
  hp = q_ref.shape[-1]
  length = len_ref[()] + dep
  lo, hi = _split_range(length, block_k, num_splits)
  q = q_ref[...].astype(jnp.float32) * qk_scale          # [hp]; padded lanes are zero
  dmask = None if hp == head_dim else (jnp.arange(hp) < head_dim)[None, :]

  def body(i, carry):
    o, m, l = carry
    start = i * block_k
    rmask = (start + jnp.arange(block_k)) < length       # [bk]
    mask = rmask[:, None] if dmask is None else rmask[:, None] & dmask
    kb = C.load(k_ref.at[pl.ds(start, block_k), :], mask=mask, other=0.0)
    s = jnp.sum(kb.astype(jnp.float32) * q[None, :], axis=1)          # [bk], log2 units
    s = jnp.where(rmask, s, C.MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)                                           # [bk]
    vb = C.load(v_ref.at[pl.ds(start, block_k), :], mask=mask, other=0.0)
    o = o * alpha + jnp.sum(p[:, None] * vb.astype(jnp.float32), axis=0)
    return o, m_new, l * alpha + jnp.sum(p)

  init = (jnp.zeros((hp,), jnp.float32), jnp.float32(C.MASK_VALUE), jnp.float32(0.0))
  o, m, l = jax.lax.fori_loop(lo, hi, body, init)
  _write(out_refs, o, m, l, num_splits=num_splits)


def _kernel_dot(len_ref, q_ref, k_ref, v_ref, *out_refs, qk_scale: float, block_k: int,
                head_dim: int, num_splits: int, precision, pdl: bool = False):
  """g > 1. q_ref [gp, hp]; k_ref, v_ref [s, hp]; out o [gp, hp] (+ m, l [gp])."""
  dep = C.grid_dependency(pdl)
  gp, hp = q_ref.shape
  length = len_ref[()] + dep
  lo, hi = _split_range(length, block_k, num_splits)
  q = q_ref[...]                                                    # [gp, hp]
  dmask = None if hp == head_dim else (jnp.arange(hp) < head_dim)[None, :]

  def body(i, carry):
    o, m, l = carry
    start = i * block_k
    rmask = (start + jnp.arange(block_k)) < length
    mask = rmask[:, None] if dmask is None else rmask[:, None] & dmask
    kb = C.load(k_ref.at[pl.ds(start, block_k), :], mask=mask, other=0.0)
    s = C.dot(q, kb, trans_b=True, precision=precision) * qk_scale   # [gp, bk]
    s = jnp.where(rmask[None, :], s, C.MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    vb = C.load(v_ref.at[pl.ds(start, block_k), :], mask=mask, other=0.0)
    o = o * alpha[:, None] + C.dot(p.astype(vb.dtype), vb, precision=precision)
    return o, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((gp, hp), jnp.float32),
          jnp.full((gp,), C.MASK_VALUE, jnp.float32),
          jnp.zeros((gp,), jnp.float32))
  o, m, l = jax.lax.fori_loop(lo, hi, body, init)
  _write(out_refs, o, m, l, num_splits=num_splits)


def _out_specs(b: int, kh: int, rows: tuple, hp: int, num_splits: int, dtype):
  """(out_shape, out_specs) of a decode kernel's attention output, per (row, kv head, split):
  one split: the normalised output [b, k, (gp,) hp] in dtype; several: the float32 partials
  (o [b, k, p, (gp,) hp], m and l [b, k, p, (gp)]) that `_merge_splits` combines."""
  if num_splits == 1:
    return (jax.ShapeDtypeStruct((b, kh, *rows, hp), dtype),
            pl.BlockSpec((None, None, *rows, hp), lambda i, j, p: (i, j) + (0,) * (len(rows) + 1)))
  z = (0,) * len(rows)
  return ((jax.ShapeDtypeStruct((b, kh, num_splits, *rows, hp), jnp.float32),
           jax.ShapeDtypeStruct((b, kh, num_splits, *rows), jnp.float32),
           jax.ShapeDtypeStruct((b, kh, num_splits, *rows), jnp.float32)),
          (pl.BlockSpec((None, None, None, *rows, hp), lambda i, j, p: (i, j, p, *z, 0)),
           pl.BlockSpec((None, None, None, *rows), lambda i, j, p: (i, j, p, *z)),
           pl.BlockSpec((None, None, None, *rows), lambda i, j, p: (i, j, p, *z))))


def _merge_splits(out, num_splits: int, dtype):
  """The kernel's attention output -> [b, k, (gp,) hp] in dtype (splits merged by their softmax
  statistics: a small XLA reduction)."""
  if num_splits == 1:
    return out
  o_part, m_part, l_part = out          # [b, k, p, (gp,) hp], [b, k, p, (gp)]
  m_max = jnp.max(m_part, axis=2, keepdims=True)
  w = jnp.exp2(m_part - m_max)          # empty splits: m = MASK_VALUE -> weight 0
  l_tot = jnp.sum(l_part * w, axis=2)
  o = jnp.sum(o_part * w[..., None], axis=2) / jnp.maximum(l_tot, 1e-30)[..., None]
  return o.astype(dtype)


def _check(q, k_cache, v_cache, lengths):
  assert q.ndim == 3, f"q must be [b, n, h], got shape {q.shape}"
  assert k_cache.ndim == 4, f"k_cache must be [b, k, s, h], got shape {k_cache.shape}"
  assert k_cache.shape == v_cache.shape, (
      f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
  b, n, h = q.shape
  bk_, kh, s, hk = k_cache.shape
  assert bk_ == b, f"batch of q ({b}) != batch of k_cache ({bk_})"
  assert hk == h, f"head_dim of q ({h}) != head_dim of k_cache ({hk})"
  assert n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  assert lengths.shape == (b,), f"lengths must be [b]=[{b}], got {lengths.shape}"
  assert s >= 1, f"cache capacity s={s} must be >= 1"
  C.check_dtype("q", q)
  C.check_dtype("k_cache", k_cache)
  assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} != v_cache {v_cache.dtype}"


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, config=None, interpret=False):
  """q [b, n, h]; k_cache, v_cache [b, k, s, h]; lengths [b] -> [b, n, h] in q.dtype."""
  _check(q, k_cache, v_cache, lengths)
  config = config or DecodeConfig()
  b, n, h = q.shape
  _, kh, s, _ = k_cache.shape
  g = n // kh
  hp = C.head_dim_padded(h)
  scale = h ** -0.5 if scale is None else float(scale)
  qk_scale = scale * C.LOG2E                         # scores kept in log2 units: exp2
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)

  use_dot = g > 1 or config.mha_dot
  block_k, num_stages = config.resolve(use_dot, hp)
  bk = _block_k_for(s, block_k)
  if bk == 0:  # capacity not a multiple of 16: pad the cache (a copy; avoid in the engine)
    pad = (-s) % 16
    k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, pad), (0, 0)))
    s += pad
    bk = _block_k_for(s, block_k)
  num_splits = choose_num_splits(config, b, kh, s, bk)
  precision = C.dot_precision(k_cache.dtype)
  kv_dtype = k_cache.dtype

  kv_spec = pl.BlockSpec((None, None, s, hp), lambda i, j, p: (i, j, 0, 0))
  len_spec = pl.BlockSpec((None,), lambda i, j, p: (i,))
  if not use_dot:
    qx = q.reshape(b, kh, h).astype(kv_dtype)
    if hp != h:
      qx = jnp.pad(qx, ((0, 0), (0, 0), (0, hp - h)))
    q_spec = pl.BlockSpec((None, None, hp), lambda i, j, p: (i, j, 0))
    kernel = functools.partial(_kernel_vec, qk_scale=qk_scale, block_k=bk, head_dim=h,
                               num_splits=num_splits, pdl=C.pdl_on(interpret, b))
    rows = ()
  else:
    gp = max(16, pl.next_power_of_2(g))
    qx = q.reshape(b, kh, g, h).astype(kv_dtype)
    qx = jnp.pad(qx, ((0, 0), (0, 0), (0, gp - g), (0, hp - h)))
    q_spec = pl.BlockSpec((None, None, gp, hp), lambda i, j, p: (i, j, 0, 0))
    kernel = functools.partial(_kernel_dot, qk_scale=qk_scale, block_k=bk, head_dim=h,
                               num_splits=num_splits, precision=precision, pdl=C.pdl_on(interpret, b))
    rows = (gp,)

  out_shape, out_specs = _out_specs(b, kh, rows, hp, num_splits, q.dtype)

  out = pl.pallas_call(
      kernel,
      grid=(b, kh, num_splits),
      in_specs=[len_spec, q_spec, kv_spec, kv_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=C.triton_compiler_params(config.num_warps, num_stages),
      interpret=interpret,
      name="ftjax_decode_attention",
  )(lengths, qx, k_cache, v_cache)

  o = _merge_splits(out, num_splits, q.dtype)
  if not use_dot:
    return o[..., :h].reshape(b, n, h)
  return o[:, :, :g, :h].reshape(b, n, h)


@functools.partial(jax.jit, static_argnames=("scale",))
def decode_attention_reference(q, k_cache, v_cache, lengths, *, scale=None):
  """Float32 plain-jnp twin of `decode_attention` (same shapes; returns q.dtype)."""
  _check(q, k_cache, v_cache, lengths)
  b, n, h = q.shape
  _, kh, s, _ = k_cache.shape
  scale = h ** -0.5 if scale is None else float(scale)
  qf = q.astype(jnp.float32).reshape(b, kh, n // kh, h)
  kf = k_cache.astype(jnp.float32)
  vf = v_cache.astype(jnp.float32)
  logits = jnp.einsum("bkgh,bksh->bkgs", qf, kf,
                      precision=jax.lax.Precision.HIGHEST) * scale
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)
  valid = jnp.arange(s)[None, :] < lengths[:, None]                  # [b, s]
  logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  # Select, not multiply: cache contents past the length may be anything (NaN included).
  vf = jnp.where(valid[:, None, :, None], vf, 0.0)
  o = jnp.einsum("bkgs,bksh->bkgh", p, vf, precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, n, h).astype(q.dtype)


# ----------------------------------------------------------- append: the new token's K/V written inside
# `decode_attention_append` is the decode step's attention with the steps around it folded in. The
# q/k/v projection hands over its split-K partials ([S, b, heads, h] float32, unreduced); each program
# sums the slices of its own heads, applies the per-channel scale (int8 weights) and the bias, rounds
# them to the cache dtype (what the cache holds and what `decode_attention` would have read), writes
# the new key and value into the cache at `positions` (the caches are aliased to the outputs: donated
# and updated in place) and attends over keys [0, positions] with the new key taken from registers.
# That replaces the XLA kernels between the projection and the attention (the sum + bias + cast of q,
# one scatter each for k and v: ~6 us a layer at batch 1 on an H100). Splits: only the split holding
# `positions` (the last valid key) writes. head_dim must be a power of two >= 16 (the cache blocks
# are stored whole); other shapes use `decode_attention` after an XLA scatter.


def _append_prologue(i, j, refs, *, S, g, hp, has_mult, has_bias, dtype, offsets=(0, 0, 0)):
  """(q [hp] or [gp, hp], k_new [hp], v_new [hp]) float32 for row i, kv head j, rounded to dtype.
  offsets: where q, k and v start on their refs' head axis (a packed q/k/v source: (0, n, n + k))."""
  q_ref, k_ref, v_ref = refs[:3]
  extra = list(refs[3:])
  mults = [extra.pop(0) for _ in range(3)] if has_mult else [None] * 3
  biases = [extra.pop(0) for _ in range(3)] if has_bias else [None] * 3
  zero = i * 0

  def gather(ref, mref, bref, rows, off):
    # ref [S, b, kh, rows?, h]: the row's partials of kv head j (g query heads for q)
    def at(r, *lead):
      if rows is None:
        return r.at[(*lead, j + off, pl.ds(zero, hp))]
      return r.at[(*lead, j, pl.ds(zero, rows), pl.ds(zero, hp))]

    mask = None if rows is None or rows == g else (jnp.arange(rows) < g)[:, None]
    ld = lambda r, *lead: (C.load(at(r, *lead), mask=mask, other=0) if mask is not None  # noqa: E731
                           else at(r, *lead)[...]).astype(jnp.float32)
    acc = ld(ref, zero, i)
    for s in range(1, S):
      acc = acc + ld(ref, zero + s, i)
    if mref is not None:
      acc = acc * ld(mref)
    if bref is not None:
      acc = acc + ld(bref)
    return acc.astype(dtype).astype(jnp.float32)

  gp = None if g == 1 else max(16, pl.next_power_of_2(g))
  q = gather(q_ref, mults[0], biases[0], gp, offsets[0])
  k_new = gather(k_ref, mults[1], biases[1], None, offsets[1])
  v_new = gather(v_ref, mults[2], biases[2], None, offsets[2])
  return q, k_new, v_new


def _kernel_append(pos_ref, *refs, S, g, hp, has_mult, has_bias, qk_scale, block_k, num_splits,
                   precision, s_cap, pdl: bool = False, offsets=(0, 0, 0)):
  dep = C.grid_dependency(pdl)
  n_in = 3 + 3 * has_mult + 3 * has_bias
  src, (kc_ref, vc_ref), outs = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
  o_outs, (ko_ref, vo_ref) = outs[:-2], outs[-2:]
  i, j = pl.program_id(0) + dep, pl.program_id(1) + dep
  dtype = kc_ref.dtype
  q, k_new, v_new = _append_prologue(i, j, src, S=S, g=g, hp=hp, has_mult=has_mult, has_bias=has_bias,
                                     dtype=dtype, offsets=offsets)
  pos = jnp.minimum(pos_ref[()], s_cap - 1)
  length = pos + 1
  lo, hi = _split_range(length, block_k, num_splits)
  writer = True
  if num_splits > 1:
    per_split = pl.cdiv(pl.cdiv(length, block_k), num_splits)
    writer = pl.program_id(2) == (pos // block_k) // per_split

  @pl.when(writer)
  def _():
    zero = i * 0
    C.store(ko_ref.at[pl.ds(pos, 1), pl.ds(zero, hp)], k_new[None, :].astype(ko_ref.dtype))
    C.store(vo_ref.at[pl.ds(pos, 1), pl.ds(zero, hp)], v_new[None, :].astype(vo_ref.dtype))

  def kv_block(ref, new, start):
    rows = start + jnp.arange(block_k)
    blk = C.load(ref.at[pl.ds(start, block_k), :], mask=(rows < length)[:, None], other=0.0)
    blk = blk.astype(jnp.float32)
    return rows, jnp.where((rows == pos)[:, None], new[None, :], blk)   # the new token from registers

  if g == 1:
    qs = q * qk_scale

    def body(b_, carry):
      o, m, l = carry
      rows, kb = kv_block(kc_ref, k_new, b_ * block_k)
      s = jnp.where(rows < length, jnp.sum(kb * qs[None, :], axis=1), C.MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new)
      _, vb = kv_block(vc_ref, v_new, b_ * block_k)
      return o * alpha + jnp.sum(p[:, None] * vb, axis=0), m_new, l * alpha + jnp.sum(p)

    init = (jnp.zeros((hp,), jnp.float32), jnp.float32(C.MASK_VALUE), jnp.float32(0.0))
  else:
    qd = q.astype(dtype)
    gp = q.shape[0]

    def body(b_, carry):
      o, m, l = carry
      rows, kb = kv_block(kc_ref, k_new, b_ * block_k)
      s = C.dot(qd, kb.astype(dtype), trans_b=True, precision=precision) * qk_scale    # [gp, bk]
      s = jnp.where((rows < length)[None, :], s, C.MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new[:, None])
      _, vb = kv_block(vc_ref, v_new, b_ * block_k)
      o = o * alpha[:, None] + C.dot(p.astype(dtype), vb.astype(dtype), precision=precision)
      return o, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((gp, hp), jnp.float32), jnp.full((gp,), C.MASK_VALUE, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
  o, m, l = jax.lax.fori_loop(lo, hi, body, init)
  _write(o_outs, o, m, l, num_splits=num_splits)


# The append kernel's default: it runs in the batch-1..16 decode step, where b * k programs are few (16
# at GPT 1.3B, batch 1) and each would otherwise walk its whole past alone: 64-key blocks, one per split
# if need be, so that a long context spreads over ~target_programs programs.
# 2 warps where head_dim <= 64 (DecodeConfig.small_head_warps).
APPEND_CONFIG = DecodeConfig(block_k=64, min_blocks_per_split=1, small_head_warps=2)


def append_supported(head_dim: int, capacity: int) -> bool:
  """Whether `decode_attention_append` takes these shapes (else: XLA scatter + decode_attention)."""
  return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and capacity % 16 == 0


def _check_append(q, k, v, k_cache, v_cache, positions, mults, biases):
  assert q.ndim == 4 and k.ndim == 4 and v.ndim == 4, (
      f"q, k, v must be [S, b, heads, h] partials, got shapes {q.shape}, {k.shape}, {v.shape}")
  assert k_cache.ndim == 4 and k_cache.shape == v_cache.shape, (
      f"k_cache {k_cache.shape} / v_cache {v_cache.shape} must be equal [b, k, s, h]")
  b, kh, s, h = k_cache.shape
  S, qb, n, qh = q.shape
  assert (qb, qh) == (b, h) and n % kh == 0, f"q {q.shape} does not match the cache {k_cache.shape}"
  for name, t in (("k", k), ("v", v)):
    assert t.shape[1:] == (b, kh, h) and t.shape[0] >= 1, (
        f"{name} must be [S, b, k, h]=[S, {b}, {kh}, {h}], got {t.shape}")
  assert q.shape[0] == k.shape[0] == v.shape[0], f"q/k/v partial counts differ: {q.shape}, {k.shape}, {v.shape}"
  assert positions.shape == (b,), f"positions must be [b]=[{b}], got {positions.shape}"
  assert append_supported(h, s), (
      f"decode_attention_append needs a power-of-two head_dim in 16..256 and a cache capacity that is a "
      f"multiple of 16 (head_dim={h}, capacity={s})")
  C.check_dtype("k_cache", k_cache)
  assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} != v_cache {v_cache.dtype}"
  for name, group in (("mults", mults), ("biases", biases)):
    if group is None:
      continue
    assert len(group) == 3, f"{name} must be (q, k, v)"
    for t, want in zip(group, ((n, h), (kh, h), (kh, h))):
      assert t.shape == want, f"{name}: expected shape {want}, got {t.shape}"


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention_append(q, k, v, k_cache, v_cache, positions, mults=None, biases=None, *, scale=None,
                            config=None, interpret=False):
  """The decode step's attention, the new token's K/V written in the same kernel.

  q [S, b, n, h], k / v [S, b, k, h]: split-K partials of the q/k/v projections (float32; S = 1 for
  finished values); mults (q [n, h], k [k, h], v [k, h]) or None: per-channel scales of the partials'
  sums (int8 weights); biases likewise or None. Packed (k = v = None): q is one projection's partials
  [S, b, n + 2k, h] with q, k and v in that order on the head axis (n = k: no grouped query heads), and mults /
  biases are single arrays [n + 2k, h] or None. k_cache / v_cache [b, k, s, h] (aliased to the
  outputs: updated in place where the caller's buffers are dead, as in the engine's donated step; the
  function itself donates nothing, so an eager caller keeps its arrays); positions
  [b] int32, where each row's new token goes (< s; keys [0, positions] are attended).
  -> (out [b, n, h] in the cache dtype, k_cache, v_cache) with the new K/V at `positions`.
  """
  offsets = (0, 0, 0)
  if k is None and v is None:    # one packed q/k/v source, read three times at head offsets
    _, kh, _, _ = k_cache.shape
    assert q.ndim == 4 and q.shape[2] == 3 * kh, (
        f"packed q/k/v partials must be [S, b, 3 * k, h] with k = {kh} kv heads (no grouped query heads), "
        f"got {q.shape}")
    for name, t in (("mults", mults), ("biases", biases)):
      assert t is None or getattr(t, "shape", None) == (3 * kh, q.shape[3]), (
          f"{name}: a packed source takes one [3 * k, h] = {(3 * kh, q.shape[3])} array, got "
          f"{getattr(t, 'shape', type(t).__name__)}")
    part = jax.ShapeDtypeStruct((q.shape[0], q.shape[1], kh, q.shape[3]), q.dtype)
    _check_append(part, part, part, k_cache, v_cache, positions, None, None)
    offsets = (0, kh, 2 * kh)
    mults = None if mults is None else (mults,) * 3
    biases = None if biases is None else (biases,) * 3
    q = k = v = q
  else:
    _check_append(q, k, v, k_cache, v_cache, positions, mults, biases)
  config = config or APPEND_CONFIG
  S, b, n, h = q.shape
  _, kh, s, _ = k_cache.shape
  packed = offsets != (0, 0, 0)
  if packed:
    n = kh
  g = n // kh
  scale = h ** -0.5 if scale is None else float(scale)
  use_dot = g > 1
  block_k, num_stages = config.resolve(use_dot, h)
  bk = _block_k_for(s, block_k)
  num_splits = choose_num_splits(config, b, kh, s, bk)
  positions = positions.astype(jnp.int32)
  qx = q if packed else (q.reshape(S, b, kh, h) if g == 1 else q.reshape(S, b, kh, g, h))
  flat = lambda t: None if t is None else (  # noqa: E731
      t if packed else (t.reshape(kh, h) if g == 1 else t.reshape(kh, g, h)))
  extra = []
  if mults is not None:
    extra += [flat(mults[0]), mults[1], mults[2]]
  if biases is not None:
    extra += [flat(biases[0]), biases[1], biases[2]]
  srcs = [qx, k, v] + extra

  whole = lambda a: pl.BlockSpec(tuple(a.shape), lambda i, j, p: (0,) * a.ndim)  # noqa: E731
  kv_spec = pl.BlockSpec((None, None, s, h), lambda i, j, p: (i, j, 0, 0))
  pos_spec = pl.BlockSpec((None,), lambda i, j, p: (i,))
  rows = () if g == 1 else (max(16, pl.next_power_of_2(g)),)
  o_shape, o_specs = _out_specs(b, kh, rows, h, num_splits, k_cache.dtype)
  o_shape, o_specs = ([o_shape], [o_specs]) if num_splits == 1 else (list(o_shape), list(o_specs))
  n_src = len(srcs)
  kernel = functools.partial(
      _kernel_append, S=S, g=g, hp=h, has_mult=mults is not None, has_bias=biases is not None,
      qk_scale=scale * C.LOG2E, block_k=bk, num_splits=num_splits,
      precision=C.dot_precision(k_cache.dtype), s_cap=s, pdl=C.pdl_on(interpret, b), offsets=offsets)
  outs = pl.pallas_call(
      kernel,
      grid=(b, kh, num_splits),
      in_specs=[pos_spec] + [whole(a) for a in srcs] + [kv_spec, kv_spec],
      out_specs=o_specs + [kv_spec, kv_spec],
      out_shape=o_shape + [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2,
      input_output_aliases={1 + n_src: len(o_shape), 2 + n_src: len(o_shape) + 1},
      compiler_params=C.triton_compiler_params(config.warps(h), num_stages),
      interpret=interpret,
      name="ftjax_decode_attention_append",
  )(positions, *srcs, k_cache, v_cache)
  k_cache, v_cache = outs[-2:]
  o = _merge_splits(outs[0] if num_splits == 1 else outs[:3], num_splits, k_cache.dtype)
  if g > 1:
    o = o[:, :, :g]
  return o.reshape(b, n, h), k_cache, v_cache


def decode_attention_append_reference(q, k, v, k_cache, v_cache, positions, mults=None, biases=None, *,
                                      scale=None):
  """Plain-jnp twin of `decode_attention_append`: finish q/k/v, scatter, `decode_attention_reference`."""
  if k is None and v is None:   # packed: q [S, b, 3k, h]; mults / biases [3k, h]
    kh = k_cache.shape[1]
    q, k, v = q[:, :, :kh], q[:, :, kh:2 * kh], q[:, :, 2 * kh:]
    mults = None if mults is None else (mults[:kh], mults[kh:2 * kh], mults[2 * kh:])
    biases = None if biases is None else (biases[:kh], biases[kh:2 * kh], biases[2 * kh:])
  def finish(t, i):
    y = jnp.sum(t.astype(jnp.float32), axis=0)
    if mults is not None:
      y = y * mults[i].astype(jnp.float32)
    if biases is not None:
      y = y + biases[i].astype(jnp.float32)
    return y.astype(k_cache.dtype)

  qf, kf, vf = finish(q, 0), finish(k, 1), finish(v, 2)
  rows = jnp.arange(k_cache.shape[0])
  positions = jnp.minimum(positions.astype(jnp.int32), k_cache.shape[2] - 1)
  k_cache = k_cache.at[rows, :, positions].set(kf)
  v_cache = v_cache.at[rows, :, positions].set(vf)
  out = decode_attention_reference(qf, k_cache, v_cache, positions + 1, scale=scale)
  return out, k_cache, v_cache
