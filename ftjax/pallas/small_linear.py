"""Small-M linear: y_i[M, N_i] = x[M, K] @ W_i[K, N_i] for a few weights sharing K, M <= 64.

Batch-1..16 decode is a chain of "skinny" matmuls: M (rows) is tiny and each weight is large
(2-64 MB), so the op is a pure stream of W through the SMs; the ideal time is bytes(W) / HBM
bandwidth. This kernel streams the weights at close to that and does the attention q/k/v
projections (three weights sharing the input) in one launch.

Shapes (letter legend: M rows, K input features, N_i output features of weight i):
  x        [M, K]      bf16 / f16 / f32; M in 1..64 (the engine's decode steps of <= 64 rows)
  ws[i]    [K, N_i]    bf16 / f16 / f32, or int8 (weight-only quantised); [N_i, K] where
                       `transposed[i]` (K contiguous: an int8 tile is then read along K; stored
                       [K, N] its bytes reach the product through byte-wise shared-memory loads,
                       ~58 instructions per KB against ~34 transposed and ~8 for bf16, as compiled
                       by pip Triton 3.9 for sm_90 in bench/triton_sass.py)
  scales[i][N_i]       optional per-output-channel scale (of an int8 weight)
  out[i]   [M, N_i]    float32 (the caller adds bias / activation / cast in XLA)

Semantics: each weight is cast to x.dtype (as `ftjax.layers.linear.linear` does; int8 -> float
is exact), products are accumulated in float32, and the scale multiplies the float32 sum
(scales are per output channel, so they commute with the sum over K).

Algorithm. One `pallas_call` for all weights. Grid axis 0 enumerates the `block_n`-column
blocks of all weights back to back: weight i owns program ids [first_i, first_i + nb_i).
Inside the kernel a static Python loop over the weights puts each weight's code under a
`pl.when` on that range, so a program only ever streams its own weight's tile. Grid axis 1 is
split-K: program (j, s) walks K-blocks [s * per_split, min((s + 1) * per_split, nkb)) of its
column block with a `fori_loop`; each step loads an x tile [R, block_k] (R = `tile_rows(M)`:
16 rows, the smallest tensor-core tile, up to M = 16, else the next power of two; rows >= M are
masked off, so they are zeros and cost no memory traffic) and a W tile [block_k, block_n]
(int8 converted to x.dtype in registers after the load), and accumulates `dot(x, w)` in float32. The program stores rows < M, columns < N_i of
its [R, block_n] result into out_i[s] ([num_splits, M, N_i] float32, one output per weight).
x, the weights and the outputs are passed whole and indexed in the kernel with `pl.ds` and
masks: a K that is not a multiple of block_k and an N that is not a multiple of block_n are
masked loads (`other=0`) / masked stores of the last block, and nothing is padded or copied
around the call. After the call plain jnp sums the partials over s and multiplies the scale:
XLA fuses that with whatever elementwise epilogue the caller applies (bias, activation, cast)
into one small kernel; with one split the partial is the result (a free reshape).

Auto configuration (`choose_config`): the W tile starts at about `tile_bytes` (16 KB: block_n
= 256 bytes of a row, 128 for int8; block_k the rest) and, for int8 and float32 weights, shrinks
(block_k first, down to 32, then block_n, down to 32, never below `min_tile_bytes`, 8 KB) while
the weights have fewer than `target_programs * min_blocks_per_split` tiles; bf16 / f16 tiles do
not shrink (measured slower); then
num_splits = ceil(target_programs / column blocks over all weights), capped so that each split
keeps >= `min_blocks_per_split` K-blocks, at `max_splits`, and so that the float32 partials
(num_splits * M * sum N_i * 4 bytes) stay below `max_partial_fraction` of the weight bytes (or
below 2 MB, which stays in L2); finally rounded so that no split is empty. `num_stages` is
lowered where the pipeline stages would not fit the shared memory. int8 calls of 32 MB and more
(`large_bytes`: GPT 6.7B's q/k/v, fc1 and fc2) aim for `large_programs` (264) programs of
`large_warps` (8) warps instead: measured 7% faster on 6.7B's int8 decode step, slower for bf16.

Swapped operands (`swap_ab`): with 2-byte weights the product is computed transposed, W tile as the
left operand ([block_n, block_k] x [block_k, R] -> a [block_n, R] accumulator, transposed once before
the store): a tile of >= 64 rows, which Triton compiles to Hopper's asynchronous wgmma (`HGMMA`, 8 a
loop step) instead of 16-row mma.sync (`HMMA`, 16). Measured on an H100 (bench/RESULTS.md, fifteenth
session): decode steps 350M bf16 0.70 -> 0.68 ms, 1.3B bf16 1.319 -> 1.308. int8 tiles are not swapped:
converted in registers they must then be re-laid for wgmma's register operand (byte-wise shared-memory
loads and ~5x the permutes), and the 1.3B int8 step went 1.00 -> 1.22 ms.

Lowering: Pallas' Triton lowering (`CompilerParams` of `jax.experimental.pallas.triton`,
passed explicitly). The op is a memory-bound stream whose matrix products have 16 rows:
what matters is enough W bytes in flight per SM, which Triton's software pipelining of the W
loads (`num_stages`) and several resident programs per SM give. The same kernel body runs on
CPU under `interpret=True` in jax 0.10 and 0.11, which is what CI tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C
from ftjax.pallas.add_norm import scale_shift, mean_rstd

ROWS = 16                                    # rows of an x tile (masked past M): the smallest dot tile
MAX_ROWS = 64                                # M up to this runs with an x tile of tile_rows(M) rows
DEQUANTS = ("auto", "cvt", "bits", "asm")
MAX_WEIGHTS = 3
WEIGHT_DTYPES = C.SUPPORTED_DTYPES + (jnp.dtype(jnp.int8),)
SMEM_BUDGET = 192 * 1024                     # H100: 227 KB of shared memory per block, with margin
L2_PARTIAL_BYTES = 2 * 2**20                 # partials this small stay in the 50 MB L2


def tile_rows(M: int) -> int:
  """Rows of the kernel's x tile for M rows: 16 (the smallest dot tile) up to 16 rows, else the next power
  of two (<= MAX_ROWS); rows past M are masked off."""
  return max(ROWS, pl.next_power_of_2(M))


def _pow2(v) -> bool:
  return v >= 16 and v & (v - 1) == 0


def _floor_pow2(v: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(v, 1)))))


@dataclasses.dataclass(frozen=True)
class SmallLinearConfig:
  """Tunables of the small-M linear kernel.

  block_n: output columns per program (a power of two >= 16); None = auto.
  block_k: K rows per loop step (a power of two >= 16); None = auto.
  num_splits: split-K factor (clamped to the number of K-blocks); None = auto, so that
    (column blocks over all weights) * splits ~ target_programs.
  num_warps, num_stages: Triton launch / software-pipelining depth (num_stages is lowered where
    the stages would not fit the shared memory).
  large_warps, large_programs, large_bytes: an int8 call whose weights hold at least large_bytes (all
    weights of the call together) runs with large_warps warps (None: num_warps) and aims for
    large_programs programs (None: target_programs). Measured on an H100 (bench/RESULTS.md): GPT 6.7B's
    int8 decode step 3.53 -> 3.28 ms with 8 warps and 264 programs for q/k/v, fc1 and fc2 (32 MB and
    more); 8 warps alone 3.39; bf16 weights were slower with 8 warps (5.10 -> 5.27 ms), so they keep
    num_warps; at 1.3B no int8 call reaches 32 MB.
  target_programs: programs to aim for: 4 waves of a 132-SM H100 (several programs are
    resident per SM, so this keeps many W tiles in flight).
  wide_programs: programs to aim for when x has more than 16 rows and the weights are 2-byte floats
    (its tile more; None: target_programs). int8 calls keep target_programs: a projection that
    normalises its input in the kernel (the fused decode step) does that elementwise work in every
    program, and twice the programs halve each one's share; 1.3B's int8 batch-64 step measured 3.73 ->
    3.53 ms (prompt 384) and 2.71 -> 2.44 ms (prompt 128) with 528 against 264, bf16 the same
    either way (bench/RESULTS.md, nineteenth session).
  wide_min_programs, wide_min_tile: a call with more than 16 rows and 2-byte weights whose auto tiles
    would give fewer programs than wide_min_programs (under one wave of an H100's 132 SMs) takes
    wide_min_tile x wide_min_tile tiles (block_n x block_k; 8 KB) when that gives more programs (None:
    off). Such calls have their splits capped by the float32 partials (splits * M * N * 4 bytes): at 64
    rows and N of 1024-4096 the 16 KB tiles left 48-64 programs. GPT-350M's batch-64 decode step
    measured 1.39-1.43 -> 1.31-1.34 ms with 64 x 64 tiles on all four projections, and slower (1.73 ms)
    with the partial cap raised instead (bench/RESULTS.md, twenty-second session); beside the old tiles in
    one run, 1.43 -> 1.32 ms (twenty-third). At 1.3B only the o projection at 64 rows falls under the
    rule: its batch-64 step measured the same either way.
  min_blocks_per_split: auto splits keep at least this many K-blocks per program.
  max_splits: auto splits never exceed this.
  tile_bytes: auto tiles start at about this many bytes of W per loop step.
  min_tile_bytes: auto tiles never shrink below this many bytes of W; None = tile_bytes for 2-byte
    weights (no shrinking: smaller bf16 tiles measured slower), 8 KB otherwise.
  row_bytes: auto block_n spans this many bytes of a weight row; None = 256 (128 for int8): 256-byte
    rows measured 7-8% faster decode steps than 128-byte ones for bf16 (bench/RESULTS.md), int8 the same.
  max_partial_fraction: auto splits keep the float32 partials written (splits * M * N * 4
    bytes) below this fraction of the weight bytes (or below 2 MB, which stays in L2).
  dequant: how an int8 weight tile becomes x.dtype (all exact): "cvt" (a plain cast: Triton emits a
    conversion instruction per element), "bits" (exponent trick in jnp integer/float ops: the byte
    is placed in the mantissa of 2^23 and 2^23 + 128 subtracted), "asm" (the same trick in inline
    PTX, four bytes a time with `prmt`; GPU only), "auto" (= "cvt": the three measured the same
    decode step on an H100, bench/RESULTS.md).
  swap_ab: W as the left operand of the tile product (see the module docstring); None = where every weight
    and x are 2-byte floats and x has at most 16 rows (int8 swapped measured slower).
  """
  block_n: int | None = None
  block_k: int | None = None
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 3
  large_warps: int | None = 8
  large_programs: int | None = 264
  large_bytes: int = 32 << 20
  target_programs: int = 528
  wide_programs: int | None = 264
  wide_min_programs: int | None = 128
  wide_min_tile: int = 64
  min_blocks_per_split: int = 2
  max_splits: int = 32
  tile_bytes: int = 16384
  min_tile_bytes: int | None = None
  row_bytes: int | None = None
  max_partial_fraction: float = 0.25
  dequant: str = "auto"
  swap_ab: bool | None = None

  def __post_init__(self):
    for name in ("block_n", "block_k"):
      v = getattr(self, name)
      assert v is None or (isinstance(v, int) and _pow2(v)), (
          f"SmallLinearConfig.{name}={v} must be a power of two >= 16 (or None)")
    assert self.num_splits is None or (isinstance(self.num_splits, int) and self.num_splits >= 1), (
        f"SmallLinearConfig.num_splits={self.num_splits} must be >= 1 or None")
    for name in ("num_warps", "large_warps"):
      v = getattr(self, name)
      assert v in (1, 2, 4, 8, 16) or (name == "large_warps" and v is None), (
          f"SmallLinearConfig.{name}={v} must be one of 1, 2, 4, 8, 16")
    assert isinstance(self.num_stages, int) and self.num_stages >= 1, (
        f"SmallLinearConfig.num_stages={self.num_stages} must be >= 1")
    assert self.large_programs is None or self.large_programs >= 1, (
        f"SmallLinearConfig.large_programs={self.large_programs} must be >= 1 or None")
    assert self.wide_programs is None or self.wide_programs >= 1, (
        f"SmallLinearConfig.wide_programs={self.wide_programs} must be >= 1 or None")
    assert self.wide_min_programs is None or self.wide_min_programs >= 1, (
        f"SmallLinearConfig.wide_min_programs={self.wide_min_programs} must be >= 1 or None")
    assert _pow2(self.wide_min_tile), (
        f"SmallLinearConfig.wide_min_tile={self.wide_min_tile} must be a power of two >= 16")
    assert self.target_programs >= 1, (
        f"SmallLinearConfig.target_programs={self.target_programs} must be >= 1")
    assert self.min_blocks_per_split >= 1, (
        f"SmallLinearConfig.min_blocks_per_split={self.min_blocks_per_split} must be >= 1")
    assert self.max_splits >= 1, f"SmallLinearConfig.max_splits={self.max_splits} must be >= 1"
    assert self.tile_bytes >= 1 and (self.min_tile_bytes or 1) >= 1 and (self.row_bytes or 16) >= 16, (
        f"SmallLinearConfig.tile_bytes={self.tile_bytes} / min_tile_bytes={self.min_tile_bytes} / "
        f"row_bytes={self.row_bytes}: must be >= 1 (row_bytes >= 16)")
    assert self.max_partial_fraction > 0, (
        f"SmallLinearConfig.max_partial_fraction={self.max_partial_fraction} must be > 0")
    assert self.dequant in DEQUANTS, (
        f"SmallLinearConfig.dequant={self.dequant!r} must be one of {DEQUANTS}")

  @property
  def resolved(self) -> bool:
    return None not in (self.block_n, self.block_k, self.num_splits)


# The config of calls that pass none (the model's projections); benchmarks swap it for A/Bs
# (bench/step_ab.py --sl) before an engine traces its step.
DEFAULT_CONFIG = SmallLinearConfig()


def choose_config(M: int, K: int, Ns, dtype, config: SmallLinearConfig | None = None,
                  kmajor: bool = False) -> SmallLinearConfig:
  """The fully resolved config (no None) the kernel runs with for these shapes.

  M rows, K input features, Ns the output features of each weight, dtype the weights' dtype
  (the widest one if they differ; int8 for weight-only quantised). Fields set in `config` are
  kept (num_splits clamped to the K-blocks, num_stages to the shared memory); None fields are
  chosen as described in the module docstring. kmajor: the weights are stored transposed ([N, K],
  K contiguous): the first tile spans `row_bytes` of K instead of N.
  """
  config = config or DEFAULT_CONFIG
  Ns = tuple(int(n) for n in Ns)
  assert Ns and all(n >= 1 for n in Ns), f"Ns={Ns} must be >= 1 each"
  assert K >= 1, f"K={K} must be >= 1"
  itemsize = jnp.dtype(dtype).itemsize
  max_bn = max(16, pl.next_power_of_2(max(Ns)))
  max_bk = max(16, pl.next_power_of_2(K))

  row_bytes = config.row_bytes or (128 if itemsize == 1 else 256)
  if kmajor:
    bk = config.block_k or min(max_bk, max(16, row_bytes // itemsize))
    bn = config.block_n or min(max_bn, max(16, min(256, _floor_pow2(config.tile_bytes / (bk * itemsize)))))
  else:
    bn = config.block_n or min(max_bn, max(16, row_bytes // itemsize))
    bk = config.block_k or min(max_bk, max(16, min(256, _floor_pow2(config.tile_bytes / (bn * itemsize)))))
  min_tile = config.min_tile_bytes or (config.tile_bytes if itemsize == 2 else 8192)

  def n_blocks(bn_):
    return sum(pl.cdiv(n, bn_) for n in Ns)

  # Small weights: shrink the tile until there are enough tiles to spread over the GPU.
  w_bytes = K * sum(Ns) * itemsize
  large = itemsize == 1 and w_bytes >= config.large_bytes
  target = config.target_programs
  if M > ROWS and config.wide_programs and itemsize != 1:
    target = config.wide_programs
  if large and config.large_programs:
    target = config.large_programs
  want_tiles = target * config.min_blocks_per_split
  while n_blocks(bn) * pl.cdiv(K, bk) < want_tiles:
    if config.block_k is None and bk > 32 and (bk // 2) * bn * itemsize >= min_tile:
      bk //= 2
    elif config.block_n is None and bn > 32 and bk * (bn // 2) * itemsize >= min_tile:
      bn //= 2
    else:
      break

  def split_k(bn_, bk_):
    nb = n_blocks(bn_)
    nkb = pl.cdiv(K, bk_)
    if config.num_splits is not None:
      splits_ = min(config.num_splits, nkb)
    else:
      want = pl.cdiv(target, nb)
      cap = max(1, nkb // config.min_blocks_per_split)
      partial_row_bytes = M * sum(Ns) * 4
      cap_partial = max(1, int(max(config.max_partial_fraction * w_bytes, L2_PARTIAL_BYTES)
                               // partial_row_bytes))
      splits_ = max(1, min(want, cap, config.max_splits, cap_partial))
    # No empty split: the last split gets what is left.
    return pl.cdiv(nkb, pl.cdiv(nkb, splits_))

  splits = split_k(bn, bk)
  # Wide 2-byte calls whose float32 partials cap the splits (M rows of partials per split) can end with too
  # few programs to stream the weights: smaller tiles give more column blocks for the same partial bytes.
  if (M > ROWS and itemsize == 2 and config.wide_min_programs and config.block_n is None
      and config.block_k is None and n_blocks(bn) * splits < config.wide_min_programs):
    bn2 = min(bn, max(16, min(max_bn, config.wide_min_tile)))
    bk2 = min(bk, max(16, min(max_bk, config.wide_min_tile)))
    splits2 = split_k(bn2, bk2)
    if n_blocks(bn2) * splits2 > n_blocks(bn) * splits:
      bn, bk, splits = bn2, bk2, splits2

  stage_bytes = bk * bn * itemsize + tile_rows(M) * bk * 4
  stages = max(1, min(config.num_stages, SMEM_BUDGET // stage_bytes))
  warps = (config.large_warps or config.num_warps) if large else config.num_warps
  return dataclasses.replace(config, block_n=bn, block_k=bk, num_splits=splits, num_stages=stages,
                             num_warps=warps, target_programs=target, large_warps=None, large_programs=None,
                             wide_programs=None, wide_min_programs=None)


def _transposed(ws, transposed):
  """The per-weight layout flags: None -> all [K, N]; else a list aligned with ws (True: [N, K])."""
  if transposed is None:
    return (False,) * len(ws)
  assert isinstance(transposed, (list, tuple)) and len(transposed) == len(ws), (
      f"transposed must be None or a list of {len(ws)} bools aligned with ws, got {transposed!r}")
  return tuple(bool(t) for t in transposed)


def _kn(w, t):
  """(K, N) of a weight stored [K, N] (t False) or [N, K] (t True)."""
  return (w.shape[1], w.shape[0]) if t else (w.shape[0], w.shape[1])


def _normalize(ws, scales):
  assert isinstance(ws, (list, tuple)), (
      f"ws must be a list of 1..{MAX_WEIGHTS} weights [K, N_i], got {type(ws).__name__}")
  ws = list(ws)
  assert 1 <= len(ws) <= MAX_WEIGHTS, f"ws must hold 1..{MAX_WEIGHTS} weights, got {len(ws)}"
  if scales is None:
    scales = [None] * len(ws)
  assert isinstance(scales, (list, tuple)), (
      f"scales must be None or a list aligned with ws, got {type(scales).__name__}")
  scales = list(scales)
  assert len(scales) == len(ws), f"scales has {len(scales)} entries but ws has {len(ws)}"
  return ws, scales


def _check(x, ws, scales, trans=None):
  assert hasattr(x, "shape") and x.ndim == 2, (
      f"x must be [M, K], got shape {getattr(x, 'shape', None)}")
  M, K = x.shape
  assert 1 <= M <= MAX_ROWS, f"x has M={M} rows; small_linear supports 1..{MAX_ROWS} (x.shape={x.shape})"
  assert K >= 1, f"x.shape={x.shape}: K must be >= 1"
  C.check_dtype("x", x)
  trans = trans or (False,) * len(ws)
  for i, (w, t) in enumerate(zip(ws, trans)):
    assert hasattr(w, "shape") and w.ndim == 2, (
        f"ws[{i}] must be {'[N, K] (transposed)' if t else '[K, N]'}, got shape {getattr(w, 'shape', None)}")
    wk, wn = _kn(w, t)
    assert wk == K, (f"ws[{i}].shape={w.shape}{' (transposed: [N, K])' if t else ''}: its K={wk} != K={K} "
                     f"of x.shape={x.shape}")
    assert wn >= 1, f"ws[{i}].shape={w.shape}: N must be >= 1"
    assert jnp.dtype(w.dtype) in WEIGHT_DTYPES, (
        f"ws[{i}].dtype={w.dtype} is not supported; expected one of "
        f"{[str(d) for d in WEIGHT_DTYPES]}")
  for i, (w, s, t) in enumerate(zip(ws, scales, trans)):
    if s is None:
      continue
    n = _kn(w, t)[1]
    assert hasattr(s, "shape") and s.shape == (n,), (
        f"scales[{i}] must be [N]=[{n}] for ws[{i}].shape={w.shape}, "
        f"got shape {getattr(s, 'shape', None)}")
    assert jnp.issubdtype(s.dtype, jnp.floating), f"scales[{i}].dtype={s.dtype} must be float"


# int8 -> bf16 / f16, exact, four bytes at a time (pack=4: $2 holds elements 0..3 in bytes 0..3; each
# output register holds two 16-bit results, element 2i in its low half). The sign bit is flipped
# (u = v + 128); bf16: each byte goes into the low mantissa byte of 2^23 (0x4B0000uu), 2^23 + 128 is
# subtracted (exact: the float is the integer v), and the float's upper half is the bf16 (exact: |v|
# <= 128 has at most 8 significant bits); f16: 0x64uu is 1024 + u, minus 1152 in f16x2.
_ASM_S8_BF16 = """{
.reg .b32 t, f0, f1, f2, f3, hi;
xor.b32 t, $2, 0x80808080;
mov.b32 hi, 0x4B000000;
prmt.b32 f0, t, hi, 0x7540;
prmt.b32 f1, t, hi, 0x7541;
prmt.b32 f2, t, hi, 0x7542;
prmt.b32 f3, t, hi, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}"""
_ASM_S8_F16 = """{
.reg .b32 t, hi, off;
xor.b32 t, $2, 0x80808080;
mov.b32 hi, 0x64646464;
mov.b32 off, 0x64806480;
prmt.b32 $0, t, hi, 0x5140;
prmt.b32 $1, t, hi, 0x7362;
sub.f16x2 $0, $0, off;
sub.f16x2 $1, $1, off;
}"""


def resolve_dequant(how: str, interpret: bool) -> str:
  """The int8 conversion a kernel runs: "auto" -> "cvt"; "asm" (GPU-only PTX) interpreted -> "bits",
  its jnp twin."""
  how = "cvt" if how == "auto" else how
  return "bits" if how == "asm" and interpret else how


def dequant_int8(wb, cdtype, how: str):
  """int8 tile -> cdtype (bf16 / f16 / f32), exactly; `how` one of "cvt", "bits", "asm" (see
  SmallLinearConfig.dequant)."""
  cdtype = jnp.dtype(cdtype)
  if how == "cvt" or cdtype == jnp.float32:
    return wb.astype(cdtype)
  if how == "asm":
    asm = _ASM_S8_BF16 if cdtype == jnp.bfloat16 else _ASM_S8_F16
    [out] = C.pltriton.elementwise_inline_asm(
        asm, args=[wb], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(wb.shape, cdtype)])
    return out
  assert how == "bits", f"dequant={how!r}"
  u = jax.lax.bitcast_convert_type(wb, jnp.uint8)
  if cdtype == jnp.bfloat16:
    f = jax.lax.bitcast_convert_type((u.astype(jnp.uint32) ^ 0x80) | 0x4B000000, jnp.float32)
    return (f - 8388736.0).astype(cdtype)
  h = jax.lax.bitcast_convert_type((u.astype(jnp.uint16) ^ 0x80) | 0x6400, jnp.float16)
  return (h - jnp.float16(1152.0)).astype(cdtype)


def _kernel(x_ref, *refs, Ns, firsts, K: int, M: int, block_n: int, block_k: int,
            num_splits: int, per_split: int, n_kblocks: int, precision, norm=None,
            dequant: str = "cvt", trans=None, pdl: bool = False, swap_ab: bool = False):
  """x_ref [M, K]; refs = (*w_refs [K, N_i], [stats, gamma, (beta)], *out_refs [num_splits, M, N_i]),
  all whole arrays.

  Program (j, s) computes column block j (of the weight that owns j) over K-split s and
  stores rows < M, columns < N_i of the [16, block_n] float32 result into out_i[s].
  norm = (kind, eps, n_chunks, has_beta) or None: x is normalised tile by tile first (see
  `small_linear_parts`), from the row statistics in stats [2, M, n_chunks].
  dequant: how an int8 W tile is converted (`dequant_int8`).
  trans: per weight, True where it is stored [N, K] (its tiles are read [bn, bk], product x @ tile.T).
  pdl: the grid-dependency wait (`_common.PDL`) before the first load of x or of the norm statistics.
  """
  n_w = len(Ns)
  w_refs, refs = refs[:n_w], refs[n_w:]
  if norm is not None:
    n_norm = 3 if norm[3] else 2
    norm_refs, refs = refs[:n_norm], refs[n_norm:]
  o_refs = refs
  cdtype = x_ref.dtype
  pid = pl.program_id(0)
  # A traced zero, not the literal 0, where a ref is indexed at 0 (see row0 below; a Python int
  # scalar index also trips the interpreter's store rule in jax 0.10).
  zero = pid * 0
  split = pl.program_id(1) if num_splits > 1 else zero
  if num_splits == 1:
    lo, hi = 0, n_kblocks
  else:
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_kblocks)
  ragged_k = K % block_k != 0
  # x has M rows: the tile reads R = tile_rows(M) (16, the smallest dot tile, or the next power of
  # two), the rows >= M masked off (zeros, no memory traffic). The row start is a traced zero: the
  # slice overruns the [M, K] ref on purpose (masked), which a static start could be bounds-checked
  # against.
  R = tile_rows(M)
  rmask = None if M == R else (jnp.arange(R) < M)[:, None]                # [R, 1]
  if norm is not None:
    kind, eps, n_chunks, has_beta = norm
    st_ref, g_ref = norm_refs[:2]
    b_ref = norm_refs[2] if has_beta else None
    cp = max(16, pl.next_power_of_2(n_chunks))
    smask = (jnp.arange(cp) < n_chunks)[None, :]
    smask = smask if rmask is None else smask & rmask

  def norm_stats(row0):                   # (mean [16, 1] or None, rstd [16, 1]); after the wait
    def row_sum(i):                                                       # [16] sums over the chunks
      t = C.load(st_ref.at[zero + i, pl.ds(row0, R), pl.ds(zero, cp)], mask=smask, other=0)
      return jnp.sum(t, axis=1)

    mean, rstd = mean_rstd(row_sum(0) if kind == "layernorm" else None, row_sum(1), K, kind, eps)
    return (None if mean is None else mean[:, None]), rstd[:, None]

  def normalise(xb, k0, kmask, stats):                                    # [16, bk] -> [16, bk] cdtype
    if norm is None:
      return xb
    mean, rstd = stats
    def tile(ref):                                                        # [1, bk] float32 of a [K] ref
      v = ref.at[pl.ds(k0, block_k)]
      return (v[...] if kmask is None else C.load(v, mask=kmask, other=0)).astype(jnp.float32)[None, :]

    b = None if b_ref is None else tile(b_ref)
    return scale_shift(xb.astype(jnp.float32), mean, rstd, tile(g_ref), b).astype(cdtype)

  def run(w_ref, o_ref, N: int, first: int, t: bool):
    n0 = (pid - first) * block_n
    nmask = None
    if N % block_n:
      nmask = ((n0 + jnp.arange(block_n)) < N)[None, :]                   # [1, bn]

    # The grid-dependency wait before x and the statistics are read (W, which no kernel writes, could be
    # read before it: loading the first W tile ahead of the wait measured slower, bench/RESULTS.md).
    row0 = zero + C.grid_dependency(pdl)
    stats = norm_stats(row0) if norm is not None else None

    def body(kb, acc):
      k0 = kb * block_k
      kmask = ((k0 + jnp.arange(block_k)) < K) if ragged_k else None      # [bk]
      xm = _and(rmask, None if kmask is None else kmask[None, :])
      xs = x_ref.at[pl.ds(row0, R), pl.ds(k0, block_k)]
      xb = xs[...] if xm is None else C.load(xs, mask=xm, other=0)       # [16, bk]
      xb = normalise(xb, k0, kmask, stats)
      if t:                                                               # [bn, bk], K contiguous
        ncol = None if nmask is None else ((n0 + jnp.arange(block_n)) < N)[:, None]  # [bn, 1]
        wm = _and(ncol, None if kmask is None else kmask[None, :])
        ws = w_ref.at[pl.ds(n0, block_n), pl.ds(k0, block_k)]
      else:
        wm = _and(None if kmask is None else kmask[:, None], nmask)
        ws = w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)]
      wb = ws[...] if wm is None else C.load(ws, mask=wm, other=0)       # [bk, bn] / [bn, bk]
      wb = dequant_int8(wb, cdtype, dequant) if wb.dtype == jnp.int8 else wb.astype(cdtype)
      if swap_ab:                                                         # [bn, R]: W the left operand
        if t:
          return acc + C.dot(wb, xb, trans_b=True, precision=precision)
        return acc + C.dot(wb, xb, trans_a=True, trans_b=True, precision=precision)
      return acc + C.dot(xb, wb, trans_b=t, precision=precision)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((block_n, R) if swap_ab else (R, block_n), jnp.float32))
    if swap_ab:
      acc = acc.T
    dst = o_ref.at[split, pl.ds(row0, R), pl.ds(n0, block_n)]
    om = _and(rmask, nmask)
    if om is None:
      dst[...] = acc
    else:
      C.store(dst, acc, mask=jnp.broadcast_to(om, (R, block_n)))

  trans = trans or (False,) * n_w
  if n_w == 1:
    run(w_refs[0], o_refs[0], Ns[0], 0, trans[0])
    return
  for i in range(n_w):
    if i == 0:
      cond = pid < firsts[1]
    elif i == n_w - 1:
      cond = pid >= firsts[i]
    else:
      cond = (pid >= firsts[i]) & (pid < firsts[i + 1])
    pl.when(cond)(functools.partial(run, w_refs[i], o_refs[i], Ns[i], firsts[i], trans[i]))


def _and(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def _swap_ab(how, x, ws) -> bool:
  """SmallLinearConfig.swap_ab resolved for this call (None: 2-byte x and weights, <= ROWS rows)."""
  if how is not None:
    return bool(how)
  return (x.shape[0] <= ROWS and jnp.dtype(x.dtype).itemsize == 2
          and all(jnp.dtype(w.dtype).itemsize == 2 for w in ws))


def _parts(x, ws, *, config, interpret, norm_args=(), norm=None, trans=None):
  """The kernel call: list of [num_splits, M, N_i] float32 split-K partials (scales not applied)."""
  M, K = x.shape
  trans = _transposed(ws, trans)
  Ns = tuple(int(_kn(w, t)[1]) for w, t in zip(ws, trans))
  wdtype = max((jnp.dtype(w.dtype) for w in ws), key=lambda d: d.itemsize)
  cfg = choose_config(M, K, Ns, wdtype, config, kmajor=any(trans))
  bn, bk, splits = cfg.block_n, cfg.block_k, cfg.num_splits
  n_kblocks = pl.cdiv(K, bk)
  per_split = pl.cdiv(n_kblocks, splits)
  nbs = [pl.cdiv(n, bn) for n in Ns]
  firsts = tuple(int(sum(nbs[:i])) for i in range(len(ws)))

  kernel = functools.partial(
      _kernel, Ns=Ns, firsts=firsts, K=K, M=M, block_n=bn, block_k=bk, num_splits=splits,
      per_split=per_split, n_kblocks=n_kblocks, precision=C.dot_precision(x.dtype), norm=norm,
      dequant=resolve_dequant(cfg.dequant, interpret), trans=trans, pdl=C.pdl_on(interpret, M),
      swap_ab=_swap_ab(cfg.swap_ab, x, ws))
  # Whole-array blocks (index 0): the kernel indexes x, W and the outputs itself (pl.ds + masks),
  # so nothing is padded or copied around the call.
  whole = lambda shape: pl.BlockSpec(tuple(shape), lambda j, s: (0,) * len(shape))  # noqa: E731
  out_shapes = [(splits, M, n) for n in Ns]
  return list(pl.pallas_call(
      kernel,
      grid=(int(sum(nbs)), splits),
      in_specs=[whole(x.shape)] + [whole(w.shape) for w in ws] + [whole(a.shape) for a in norm_args],
      out_specs=[whole(sh) for sh in out_shapes],
      out_shape=[jax.ShapeDtypeStruct(sh, jnp.float32) for sh in out_shapes],
      compiler_params=C.triton_compiler_params(cfg.num_warps, cfg.num_stages),
      interpret=interpret,
      name="ftjax_small_linear",
  )(x, *ws, *norm_args))


@functools.partial(jax.jit, static_argnames=("config", "interpret", "trans"))
def _small_linear(x, ws, scales, *, config, interpret, trans=None):
  parts = _parts(x, ws, config=config, interpret=interpret, trans=trans)
  # Split-K reduction and scales: plain jnp, which XLA fuses with the caller's epilogue (with
  # one split the partial is the result: a free reshape).
  outs = []
  for part, s in zip(parts, scales):
    y = part[0] if part.shape[0] == 1 else jnp.sum(part, axis=0)
    if s is not None:
      y = y * s.astype(jnp.float32)
    outs.append(y)
  return outs


@functools.partial(jax.jit, static_argnames=("config", "interpret", "kind", "eps", "trans"))
def _small_linear_parts(x, ws, norm_args, *, config, interpret, kind, eps, trans=None):
  norm = None
  if norm_args:
    norm = (kind, eps, int(norm_args[0].shape[2]), len(norm_args) == 3)
  return _parts(x, ws, config=config, interpret=interpret, norm_args=tuple(norm_args), norm=norm,
                trans=trans)


def small_linear(x, ws, scales=None, *, config: SmallLinearConfig | None = None,
                 interpret: bool = False, transposed=None):
  """x [M, K] (the engine sends up to `linear.SMALL_M_ROWS` rows); ws list of 1..3 weights [K, N_i];
  scales None or a list aligned with ws of None or [N_i] -> list of [M, N_i] float32
  (x @ ws[i].astype(x.dtype), times scales[i]).

  One kernel launch for all weights; `config` None picks the tiles and split-K with
  `choose_config`; `interpret=True` runs the kernel body on CPU. `transposed`: None, or a list of
  bools aligned with ws, True where that weight is stored transposed, [N_i, K] (K contiguous: int8
  tiles are then read without byte-wise shared-memory loads; `ftjax.layers.linear.QuantizedWeightT`).
  """
  ws, scales = _normalize(ws, scales)
  trans = _transposed(ws, transposed)
  _check(x, ws, scales, trans)
  assert config is None or isinstance(config, SmallLinearConfig), (
      f"config must be a SmallLinearConfig or None, got {type(config).__name__}")
  return _small_linear(x, tuple(ws), tuple(scales), config=config or DEFAULT_CONFIG,
                       interpret=bool(interpret), trans=trans if any(trans) else None)


def small_linear_parts(x, ws, *, norm=None, config: SmallLinearConfig | None = None, interpret: bool = False,
                       transposed=None):
  """Like `small_linear` without the reduction: list of [S, M, N_i] float32 split-K partials whose
  sum over S is x @ ws[i].astype(x.dtype) (scales are the caller's to apply, after the sum). For a
  consumer kernel that sums them itself (`add_stats`, `decode_attention_append`): no XLA kernel runs
  between the projection and it.

  norm = (stats [2, M, C], gamma [K], beta [K] or None, kind, eps) or None: x is first normalised, as
  `ftjax.pallas.add_norm.norm_from_stats(x, stats, gamma, beta, kind=kind, eps=eps)` would (stats from
  `add_stats`), tile by tile inside the kernel: the norm costs no kernel launch of its own.
  `transposed` as in `small_linear`."""
  ws, _ = _normalize(ws, None)
  trans = _transposed(ws, transposed)
  _check(x, ws, [None] * len(ws), trans)
  assert config is None or isinstance(config, SmallLinearConfig), (
      f"config must be a SmallLinearConfig or None, got {type(config).__name__}")
  norm_args, kind, eps = (), None, None
  if norm is not None:
    stats, gamma, beta, kind, eps = norm
    M, K = x.shape
    assert kind in ("layernorm", "rmsnorm"), f"norm kind={kind!r} is not 'layernorm' or 'rmsnorm'"
    assert stats.ndim == 3 and stats.shape[:2] == (2, M), f"stats must be [2, M={M}, C], got {stats.shape}"
    assert gamma.shape == (K,) and (beta is None or beta.shape == (K,)), (
        f"gamma / beta must be [K]=[{K}], got {gamma.shape} / {None if beta is None else beta.shape}")
    assert beta is None or kind == "layernorm", "beta is a LayerNorm parameter"
    norm_args = (stats, gamma) + (() if beta is None else (beta,))
    eps = float(eps)
  return _small_linear_parts(x, tuple(ws), norm_args, config=config or DEFAULT_CONFIG,
                             interpret=bool(interpret), kind=kind, eps=eps, trans=trans if any(trans) else None)


def small_linear_reference(x, ws, scales=None, transposed=None):
  """Float32 plain-jnp twin of `small_linear` (same arguments, same list of [M, N_i] float32)."""
  ws, scales = _normalize(ws, scales)
  trans = _transposed(ws, transposed)
  _check(x, ws, scales, trans)
  xf = x.astype(jnp.float32)
  outs = []
  for w, s, t in zip(ws, scales, trans):
    wf = w.astype(x.dtype).astype(jnp.float32)     # the kernel's semantics: W cast to x.dtype
    wf = wf.T if t else wf
    y = jnp.dot(xf, wf, precision=jax.lax.Precision.HIGHEST)
    if s is not None:
      y = y * s.astype(jnp.float32)
    outs.append(y)
  return outs
