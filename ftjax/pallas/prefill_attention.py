"""Prefill attention: flash attention over a ragged batch, causal (GPT) or with an additive bias
(T5 encoder / cross / decoder self-attention with relative-position bias).

Shapes (letter legend: b batch, t query length, s key length, n heads, k kv heads,
g = n // k, h head_dim):
  q        [b, t, n, h]
  k, v     [b, s, k, h]           (self-attention: s == t)
  lengths  [b] int32              valid keys per row (keys >= lengths[b] are masked), 1..s
  bias     [1 or b, n, t, s] f32  optional, added to the scaled scores before the softmax
  out      [b, t, n, h]           q.dtype; rows past a row's length hold finite values

Algorithm (FlashAttention-2 forward). One Pallas program per (head, row, block of `block_q`
queries); it loops over `block_k`-key blocks of K and V with an online softmax in float32,
scores in log2 units (exp2, the scale folded with log2 e). Only key blocks that can be valid
are visited: up to the causal diagonal and up to the row's length. The loop is split in two:
blocks that are entirely valid (below the diagonal and below the length) run without any
masking, and only the remaining diagonal / ragged-tail blocks build the mask. With `causal`,
query blocks are launched heaviest first (the grid's slowest axis runs the diagonal backwards)
so the short blocks fill the tail of the launch. GQA / MQA: the kv head of query head `i` is
`i // g`, picked by the BlockSpec index map; K/V are never repeated in memory. head_dim that
is not a power of two is padded by masked loads and stores; t or s that are not a multiple of
the block are padded in the wrapper (zeros, masked by `lengths`; padded queries sliced off).

The bias is supported in the kernel (T5 does not need the XLA route): it is read block by
block beside K, so it costs one float32 read of [n, t, s] per call, which at T5's lengths
(512) is small next to the matmuls.

Lowering: Pallas' Triton lowering (`jax.experimental.pallas.triton.CompilerParams`, passed
explicitly). It interprets on CPU with `interpret=True` under jax 0.10 and 0.11, so CI checks
the same kernel body the GPU runs, and Triton emits Hopper's wgmma for its dot on sm_90.
A Mosaic GPU (warp-specialised, TMA) kernel could go further on H100 but is only checkable on
CPU through jax's private GPU interpreter in 0.10; see bench/RESULTS.md for how far this one
gets.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
  """Tunables of the prefill kernel. None = picked from head_dim (see `resolve`)."""
  block_q: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      assert v is None or (v >= 16 and v & (v - 1) == 0), (
          f"PrefillConfig.{name}={v} must be a power of two >= 16")
    assert self.num_warps in (None, 1, 2, 4, 8, 16), f"PrefillConfig.num_warps={self.num_warps}"
    assert self.num_stages is None or self.num_stages >= 1, (
        f"PrefillConfig.num_stages={self.num_stages}")

  def resolve(self, t: int, s: int, hp: int, itemsize: int = 2,
              has_bias: bool = False, heads: int = 0) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages). heads: b * n of the call (0: unknown)."""
    # Defaults tuned on an H100 (bench/RESULTS.md): 128 x 128 tiles, 4 warps for h <= 64 and
    # 8 for h = 128, 3 pipeline stages; h = 256 keeps K/V tiles small enough for shared memory.
    bq = self.block_q or 128
    bk = self.block_k or (128 if hp <= 128 else 32)
    nw = self.num_warps or (4 if hp <= 64 else 8)
    ns = self.num_stages or (3 if hp <= 128 else 2)
    # Short inputs: shrink the tiles (never below 16, the smallest tensor-core tile).
    bq = min(bq, max(16, pl.next_power_of_2(t)))
    bk = min(bk, max(16, pl.next_power_of_2(s)))
    # Few programs (a short prompt of one row: 16 heads x 4 blocks of 128 queries is 64 programs on 132 SMs):
    # 64-query blocks on 4 warps, where block_q and num_warps are left to this.
    if self.block_q is None and heads and bq > 64 and heads * pl.cdiv(t, bq) < SMALL_GRID_PROGRAMS:
      bq = 64
      nw = self.num_warps or 4
    # Defaults that would not fit the SM's shared memory (float32 inputs, a bias tile per stage)
    # shrink: first fewer pipeline stages, then narrower K/V tiles, then fewer query rows.
    while _smem_bytes(bq, bk, hp, ns, itemsize, has_bias) > SMEM_BUDGET:
      if self.num_stages is None and ns > 2:
        ns -= 1
      elif self.block_k is None and bk > 32:
        bk //= 2
      elif self.block_q is None and bq > 32:
        bq //= 2
      else:
        break
    return bq, bk, nw, ns


# Shared memory a Triton program of this kernel may use on Hopper (227 KB per block, less a margin).
SMEM_BUDGET = 224 * 1024
# Opt-in (0: off): calls with fewer programs than this (heads x query blocks of 128) take 64-query blocks
# (PrefillConfig.resolve). At 264, whole 1.3B requests on an H100 measured the same as without (b1 512/32 48.13
# against 48.02 ms; bench/RESULTS.md, sixteenth session).
SMALL_GRID_PROGRAMS = 0


def _smem_bytes(bq, bk, hp, ns, itemsize, has_bias) -> int:
  """Estimate fitted to what Triton asked for on the H100 (tests/gpu/check_kernels.py failures):
  one K and one V tile per pipeline stage; with a bias, two float32 bias tiles and the q tile."""
  kv = ns * 2 * bk * hp * itemsize
  return kv + ((2 * bq * bk * 4 + bq * hp * itemsize) if has_bias else 0)


def _kernel(len_ref, q_ref, k_ref, v_ref, *rest, has_bias: bool, causal: bool, num_q_blocks: int,
            block_q: int, block_k: int, qk_scale: float, head_dim: int, precision, kv_group: int = 0):
  """q_ref [bq, hp]; k_ref, v_ref [s, hp]; (bias_ref [bq, s]); o_ref [bq, hp].
  kv_group > 0 (the K/V written into a cache): after the bias, start_ref [] and the two caches (inputs, aliased
  to the outputs); after o_ref, ko_ref and vo_ref [B, k, S, h] (whole). The first q head of each kv group
  (kv_group q heads a kv head) writes its q block's K and V rows into cache row start + batch row."""
  bias_ref = rest[0] if has_bias else None
  if kv_group:
    start_ref = rest[int(has_bias)]
    o_ref, ko_ref, vo_ref = rest[-3:]
  else:
    o_ref = rest[-1]
  hp = q_ref.shape[-1]
  qi = pl.program_id(2)
  if causal:
    qi = num_q_blocks - 1 - qi
  q_start = qi * block_q
  length = len_ref[()]

  if kv_group:
    head = pl.program_id(0)   # program ids outside the branch (the interpreter cannot find them inside)
    row, kvh = start_ref[()] + pl.program_id(1), head // kv_group

    @pl.when(head % kv_group == 0)
    def _write_kv():
      for src, dst in ((k_ref, ko_ref), (v_ref, vo_ref)):
        blk = src[pl.ds(q_start, block_q), :]
        C.store(dst.at[pl.ds(row, 1), pl.ds(kvh, 1), pl.ds(q_start, block_q), :],
                blk[None, None].astype(dst.dtype))

  dmask = None if hp == head_dim else (jnp.arange(hp) < head_dim)[None, :]
  q = C.load(q_ref, mask=dmask, other=0.0) if dmask is not None else q_ref[...]
  q_idx = q_start + jnp.arange(block_q)

  def step(j, carry, masked: bool):
    o, m, l = carry
    start = pl.multiple_of(j * block_k, block_k)
    k_idx = start + jnp.arange(block_k)
    if masked:
      rvalid = k_idx < length
      lmask = rvalid[:, None] if dmask is None else rvalid[:, None] & dmask
    else:
      lmask = dmask
    kb = (C.load(k_ref.at[pl.ds(start, block_k), :], mask=lmask, other=0.0)
          if lmask is not None else k_ref[pl.ds(start, block_k), :])
    s = C.dot(q, kb, trans_b=True, precision=precision) * qk_scale      # [bq, bk]
    if bias_ref is not None:
      s = s + bias_ref[:, pl.ds(start, block_k)].astype(jnp.float32) * C.LOG2E
    if masked:
      valid = rvalid[None, :]
      if causal:
        valid = valid & (k_idx[None, :] <= q_idx[:, None])
      s = jnp.where(valid, s, C.MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    vb = (C.load(v_ref.at[pl.ds(start, block_k), :], mask=lmask, other=0.0)
          if lmask is not None else v_ref[pl.ds(start, block_k), :])
    o = o * alpha[:, None] + C.dot(p.astype(vb.dtype), vb, precision=precision)
    return o, m_new, l * alpha + jnp.sum(p, axis=1)

  if causal:
    kv_end = jnp.minimum(length, q_start + block_q)
    full_end = jnp.minimum(length, q_start + 1)
  else:
    kv_end = length
    full_end = length
  n_blocks = pl.cdiv(kv_end, block_k)
  n_full = full_end // block_k

  carry = (jnp.zeros((block_q, hp), jnp.float32),
           jnp.full((block_q,), C.MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
  o, m, l = jax.lax.fori_loop(n_full, n_blocks, functools.partial(step, masked=True), carry)
  o = o * (1.0 / jnp.maximum(l, 1e-30))[:, None]
  if dmask is not None:
    C.store(o_ref, o.astype(o_ref.dtype), mask=dmask)
  else:
    o_ref[...] = o.astype(o_ref.dtype)


def _check(q, k, v, lengths, bias):
  assert q.ndim == 4, f"q must be [b, t, n, h], got shape {q.shape}"
  assert k.ndim == 4, f"k must be [b, s, k, h], got shape {k.shape}"
  assert k.shape == v.shape, f"k {k.shape} and v {v.shape} differ"
  b, t, n, h = q.shape
  bk_, s, kh, hk = k.shape
  assert bk_ == b, f"batch of q ({b}) != batch of k ({bk_})"
  assert hk == h, f"head_dim of q ({h}) != head_dim of k ({hk})"
  assert n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  assert lengths.shape == (b,), f"lengths must be [b]=[{b}], got {lengths.shape}"
  C.check_dtype("q", q)
  C.check_dtype("k", k)
  assert k.dtype == v.dtype, f"k {k.dtype} != v {v.dtype}"
  if bias is not None:
    assert bias.ndim == 4 and bias.shape[0] in (1, b) and bias.shape[1:] == (n, t, s), (
        f"bias must be [1 or b={b}, n={n}, t={t}, s={s}], got {bias.shape}")


@functools.partial(jax.jit, static_argnames=("scale", "causal", "config", "interpret"))
def prefill_attention(q, k, v, lengths, *, scale=None, causal=True, bias=None, config=None,
                      interpret=False):
  """q [b, t, n, h]; k, v [b, s, k, h]; lengths [b]; bias [1|b, n, t, s] -> [b, t, n, h]."""
  _check(q, k, v, lengths, bias)
  config = config or PrefillConfig()
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  hp = C.head_dim_padded(h)
  bq, bk, num_warps, num_stages = config.resolve(t, s, hp, jnp.dtype(q.dtype).itemsize, bias is not None,
                                                 heads=b * n)
  k = k.astype(q.dtype) if k.dtype != q.dtype else k
  v = v.astype(q.dtype) if v.dtype != q.dtype else v

  tp, sp = pl.cdiv(t, bq) * bq, pl.cdiv(s, bk) * bk
  if tp != t:
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  if sp != s:
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
  if bias is not None:
    bias = bias.astype(jnp.float32)
    if tp != t or sp != s:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tp - t), (0, sp - s)))
  out = _launch(q, k, v, lengths, bias, heads=(n, kh), offsets=(0, 0, 0), s=s, head_dim=h,
                tiles=(bq, bk, num_warps, num_stages), scale=scale, causal=causal, interpret=interpret)
  return out[:, :t] if tp != t else out


@functools.partial(jax.jit, static_argnames=("num_heads", "kv_heads", "scale", "config", "interpret"))
def prefill_attention_packed(qkv, lengths, *, num_heads: int, kv_heads: int, scale=None, config=None,
                             interpret=False, cache=None, start=None):
  """Causal self-attention with q, k and v in one array, as one projection writes them:
  qkv [b, t, n + 2k, h] (heads 0..n-1 are q, then k kv heads of K, then k of V); lengths [b] -> [b, t, n, h].

  The same kernel as `prefill_attention`; its BlockSpecs pick q, K and V out of the packed array by head
  index, so nothing splits it first (in a GPT prefill the split and the bias add were three XLA fusions
  that each copied a third of the projection's output; bench/RESULTS.md, twenty-fourth session).

  cache = (k_cache, v_cache) [B, k, S, h] and start (int), where `kernel_writes_kv` holds: the kernel also
  writes the prompt's K and V into cache rows start .. start + b - 1, positions 0 .. t - 1 (and up to the padded
  length: past each row's length the positions hold what decoding overwrites), the caches aliased to its
  outputs, and returns (out, k_cache, v_cache). `ops.attention_prefill_packed` writes them otherwise."""
  n, kh = num_heads, kv_heads
  assert qkv.ndim == 4, f"qkv must be [b, t, n + 2k, h], got shape {qkv.shape}"
  b, t, heads, h = qkv.shape
  assert heads == n + 2 * kh, f"qkv has {heads} heads, not num_heads + 2 * kv_heads = {n + 2 * kh}"
  assert kh >= 1 and n % kh == 0, f"heads n={n} must be a multiple of kv heads k={kh}"
  assert lengths.shape == (b,), f"lengths must be [b]=[{b}], got {lengths.shape}"
  C.check_dtype("qkv", qkv)
  tiles, L = _packed_tiles(qkv, n, config)
  if cache is not None:
    assert kernel_writes_kv(cache[0], qkv.dtype, h, L), (
        f"the kernel cannot write this cache: k_cache {cache[0].shape} {cache[0].dtype} for a {qkv.dtype} prompt "
        f"padded to {L} positions (see kernel_writes_kv)")
  if L != t:
    qkv = jnp.pad(qkv, ((0, 0), (0, L - t), (0, 0), (0, 0)))
  out = _launch(qkv, qkv, qkv, lengths, None, heads=(n, kh), offsets=(0, n, n + kh), s=t, head_dim=h,
                tiles=tiles, scale=scale, causal=True, interpret=interpret, cache=cache, start=start)
  if cache is None:
    return out[:, :t] if L != t else out
  out, kc, vc = out
  return (out[:, :t] if L != t else out), kc, vc


def _packed_tiles(qkv, num_heads: int, config=None):
  """(tiles (bq, bk, warps, stages), padded length) of `prefill_attention_packed` for qkv [b, t, n + 2k, h]."""
  b, t, _, h = qkv.shape
  bq, bk, num_warps, num_stages = (config or PrefillConfig()).resolve(
      t, t, C.head_dim_padded(h), jnp.dtype(qkv.dtype).itemsize, False, heads=b * num_heads)
  # q blocks and the K/V span come from the same array, so both pad to one length (bq, bk powers of two)
  return (bq, bk, num_warps, num_stages), pl.cdiv(t, max(bq, bk)) * max(bq, bk)


def packed_kernel_writes_kv(qkv, num_heads: int, k_cache, config=None) -> bool:
  """`kernel_writes_kv` for this packed prompt (its padded length by the kernel's tiles)."""
  return kernel_writes_kv(k_cache, qkv.dtype, qkv.shape[3], _packed_tiles(qkv, num_heads, config)[1])


def kernel_writes_kv(k_cache, dtype, head_dim: int, padded_len: int) -> bool:
  """Whether `prefill_attention_packed` writes the K/V into this cache in its kernel: the padded prompt fits
  the cache's positions, the head size needs no padding (the cache rows are stored whole), the dtypes agree, and
  the cache's element offsets fit int32 (the kernel indexes the whole cache from its row)."""
  return (padded_len <= k_cache.shape[2] and head_dim == C.head_dim_padded(head_dim)
          and k_cache.shape[3] == head_dim and jnp.dtype(k_cache.dtype) == jnp.dtype(dtype)
          and k_cache.size < 2 ** 31)


def _launch(q, k, v, lengths, bias, *, heads, offsets, s, head_dim, tiles, scale, causal, interpret,
            cache=None, start=None):
  """The pallas_call. q [b, tp, *, h] with its n query heads from head offsets[0]; k, v [b, sp, *, h] with
  their kv heads from offsets[1] / offsets[2] (the same array may be passed for all three); tp, sp
  multiples of the q / K tiles; s the unpadded key length (lengths clip to it) -> [b, tp, n, h].
  cache (k_cache, v_cache [B, k, S, h], tp <= S) and start: the kernel also writes K / V rows 0 .. tp - 1 into
  cache rows start + batch row -> (out, k_cache, v_cache)."""
  n, kh = heads
  g = n // kh
  oq, ok, ov = offsets
  b, tp = q.shape[:2]
  sp = k.shape[1]
  h = head_dim
  hp = C.head_dim_padded(h)
  bq, bk, num_warps, num_stages = tiles
  scale = h ** -0.5 if scale is None else float(scale)
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)
  nq = tp // bq

  def qmap(i, j, p):   # (head, row, q block) -> q / out block index
    return (j, nq - 1 - p if causal else p, oq + i, 0)

  def omap(i, j, p):
    return (j, nq - 1 - p if causal else p, i, 0)

  in_specs = [
      pl.BlockSpec((None,), lambda i, j, p: (j,)),
      pl.BlockSpec((None, bq, None, hp), qmap),
      pl.BlockSpec((None, sp, None, hp), lambda i, j, p: (j, 0, ok + i // g, 0)),
      pl.BlockSpec((None, sp, None, hp), lambda i, j, p: (j, 0, ov + i // g, 0)),
  ]
  args = [lengths, q, k, v]
  if bias is not None:
    per_row = bias.shape[0] != 1
    in_specs.append(pl.BlockSpec(
        (None, None, bq, sp),
        lambda i, j, p: (j if per_row else 0, i, nq - 1 - p if causal else p, 0)))
    args.append(bias)

  out_specs = pl.BlockSpec((None, bq, None, hp), omap)
  out_shape = jax.ShapeDtypeStruct((b, tp, n, h), q.dtype)
  aliases = {}
  if cache is not None:
    whole = pl.BlockSpec(tuple(cache[0].shape), lambda i, j, p: (0, 0, 0, 0))
    in_specs += [pl.BlockSpec((None,), lambda i, j, p: (0,)), whole, whole]
    aliases = {len(args) + 1: 1, len(args) + 2: 2}
    args += [jnp.reshape(jnp.asarray(start, jnp.int32), (1,)), *cache]
    out_specs, out_shape = [out_specs, whole, whole], [out_shape] + [
        jax.ShapeDtypeStruct(c.shape, c.dtype) for c in cache]
  kernel = functools.partial(
      _kernel, has_bias=bias is not None, causal=causal, num_q_blocks=nq, block_q=bq,
      block_k=bk, qk_scale=scale * C.LOG2E, head_dim=h, precision=C.dot_precision(q.dtype),
      kv_group=g if cache is not None else 0)
  return pl.pallas_call(
      kernel,
      grid=(n, b, nq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=C.triton_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="ftjax_prefill_attention",
  )(*args)


@functools.partial(jax.jit, static_argnames=("scale", "causal"))
def prefill_attention_reference(q, k, v, lengths, *, scale=None, causal=True, bias=None):
  """Float32 plain-jnp twin of `prefill_attention` (same shapes; returns q.dtype)."""
  _check(q, k, v, lengths, bias)
  b, t, n, h = q.shape
  _, s, kh, _ = k.shape
  scale = h ** -0.5 if scale is None else float(scale)
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32), precision=hi) * scale
  logits = logits.reshape(b, n, t, s)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 1, s)
  valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]      # [b, 1, 1, s]
  if causal:
    valid = valid & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]
  logits = jnp.where(valid, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1).reshape(b, kh, n // kh, t, s)
  vf = jnp.where((jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None],
                 v.astype(jnp.float32), 0.0)
  o = jnp.einsum("bkgts,bskh->btkgh", p, vf, precision=hi)
  return o.reshape(b, t, n, h).astype(q.dtype)
