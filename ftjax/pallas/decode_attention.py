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

  def __post_init__(self):
    assert self.block_k is None or (self.block_k >= 16 and self.block_k & (self.block_k - 1) == 0), (
        f"DecodeConfig.block_k={self.block_k} must be a power of two >= 16")
    assert self.num_splits is None or self.num_splits >= 1, (
        f"DecodeConfig.num_splits={self.num_splits} must be >= 1 or None")
    assert self.num_warps in (1, 2, 4, 8, 16), f"DecodeConfig.num_warps={self.num_warps}"
    assert self.num_stages is None or self.num_stages >= 1, (
        f"DecodeConfig.num_stages={self.num_stages}")

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
                head_dim: int, num_splits: int):
  """g == 1. q_ref [hp]; k_ref, v_ref [s, hp]; out o [hp] (+ m, l scalars)."""
  hp = q_ref.shape[-1]
  length = len_ref[()]
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
                head_dim: int, num_splits: int, precision):
  """g > 1. q_ref [gp, hp]; k_ref, v_ref [s, hp]; out o [gp, hp] (+ m, l [gp])."""
  gp, hp = q_ref.shape
  length = len_ref[()]
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
                               num_splits=num_splits)
    rows = ()
  else:
    gp = max(16, pl.next_power_of_2(g))
    qx = q.reshape(b, kh, g, h).astype(kv_dtype)
    qx = jnp.pad(qx, ((0, 0), (0, 0), (0, gp - g), (0, hp - h)))
    q_spec = pl.BlockSpec((None, None, gp, hp), lambda i, j, p: (i, j, 0, 0))
    kernel = functools.partial(_kernel_dot, qk_scale=qk_scale, block_k=bk, head_dim=h,
                               num_splits=num_splits, precision=precision)
    rows = (gp,)

  if num_splits == 1:
    out_shape = jax.ShapeDtypeStruct((b, kh, *rows, hp), q.dtype)
    out_specs = pl.BlockSpec((None, None, *rows, hp), lambda i, j, p: (i, j) + (0,) * (len(rows) + 1))
  else:
    z = (0,) * len(rows)
    out_shape = (jax.ShapeDtypeStruct((b, kh, num_splits, *rows, hp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, num_splits, *rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, num_splits, *rows), jnp.float32))
    out_specs = (pl.BlockSpec((None, None, None, *rows, hp), lambda i, j, p: (i, j, p, *z, 0)),
                 pl.BlockSpec((None, None, None, *rows), lambda i, j, p: (i, j, p, *z)),
                 pl.BlockSpec((None, None, None, *rows), lambda i, j, p: (i, j, p, *z)))

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

  if num_splits == 1:
    o = out
  else:
    o_part, m_part, l_part = out          # [b, k, p, (gp,) hp], [b, k, p, (gp)]
    m_max = jnp.max(m_part, axis=2, keepdims=True)
    w = jnp.exp2(m_part - m_max)          # empty splits: m = MASK_VALUE -> weight 0
    l_tot = jnp.sum(l_part * w, axis=2)
    o = jnp.sum(o_part * w[..., None], axis=2) / jnp.maximum(l_tot, 1e-30)[..., None]
    o = o.astype(q.dtype)
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
