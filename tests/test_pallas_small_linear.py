"""Small-M linear kernel (interpret mode on CPU) against its float32 twin.

Interpret mode fills the output buffer with NaN before the kernel runs, so a finite result also
proves that every element that is read back (rows < M of every split and column block) was
written. Fresh random inputs per case (seeded by the case). The kernel's semantics are
x @ W.astype(x.dtype) accumulated in float32, times the scale: with W cast the same way, the
reference differs from the kernel only by the order of the float32 sums, so the tolerance is a
few float32 ulps of sum_k |x_k| |W_kn| whatever the input dtype.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.pallas import small_linear as S
from ftjax.pallas.small_linear import (SmallLinearConfig, choose_config, small_linear,
                                       small_linear_reference)

BF16, F32, F16, I8 = jnp.bfloat16, jnp.float32, jnp.float16, jnp.int8
RTOL = 2e-5   # of sum_k |x| |W| |scale| per output element


def make(seed, M, K, Ns, wdtypes, xdtype=BF16, scaled=None):
  """x [M, K]; weights [K, N_i] of wdtypes (int8: random -127..127 with a random positive scale)."""
  ks = jax.random.split(jax.random.key(seed), 2 + 2 * len(Ns))
  x = jax.random.normal(ks[0], (M, K), xdtype)
  ws, scales = [], []
  for i, (n, d) in enumerate(zip(Ns, wdtypes)):
    kw, ksc = ks[2 + 2 * i], ks[3 + 2 * i]
    if jnp.dtype(d) == jnp.int8:
      ws.append(jax.random.randint(kw, (K, n), -127, 128, jnp.int32).astype(I8))
      scales.append(jax.random.uniform(ksc, (n,), F32, 0.5, 1.5) / 127.0)
    else:
      ws.append(jax.random.normal(kw, (K, n), d))
      scales.append(jax.random.uniform(ksc, (n,), F32, 0.5, 1.5) if scaled else None)
  return x, ws, scales


def check(out, x, ws, scales):
  ref = small_linear_reference(x, ws, scales)
  assert isinstance(out, list) and len(out) == len(ws)
  xa = np.abs(np.asarray(x.astype(F32), np.float64))
  for i, (o, r, w, s) in enumerate(zip(out, ref, ws, scales)):
    assert o.dtype == jnp.float32, f"out[{i}].dtype={o.dtype}"
    assert o.shape == (x.shape[0], w.shape[1]), f"out[{i}].shape={o.shape}"
    o, r = np.asarray(o, np.float64), np.asarray(r, np.float64)
    assert np.isfinite(o).all(), f"out[{i}] has non-finite values (unwritten output?)"
    mag = xa @ np.abs(np.asarray(w.astype(x.dtype).astype(F32), np.float64))
    if s is not None:
      mag = mag * np.abs(np.asarray(s, np.float64))
    err = np.abs(o - r)
    bad = err > RTOL * mag + 1e-30
    assert not bad.any(), (f"out[{i}]: {bad.sum()} elements off; max err {err.max():.3e}, "
                           f"max err / magnitude {(err / np.maximum(mag, 1e-30)).max():.3e}")


C = SmallLinearConfig
CASES = [
    # (M, K, Ns, weight dtypes, x dtype, config)                 what it covers
    (1, 256, (128,), (BF16,), BF16, C(block_n=32, block_k=64, num_splits=1)),   # aligned, M=1
    (2, 200, (100,), (BF16,), BF16, C(block_n=32, block_k=32, num_splits=3)),   # ragged N and K, split-K
    (5, 96, (48,), (F32,), F32, C(block_n=16, block_k=32, num_splits=2)),       # f32, ragged N, K = 3 blocks
    (16, 160, (64,), (I8,), BF16, C(block_n=64, block_k=32, num_splits=4)),     # int8 + scale, M=16
    (16, 64, (96, 32, 32), (BF16,) * 3, BF16, C(block_n=32, block_k=16, num_splits=2)),  # q/k/v
    (5, 120, (96, 32, 32), (I8,) * 3, BF16, C(block_n=64, block_k=32, num_splits=2)),   # q/k/v int8, ragged
    (2, 72, (80, 40), (F32, I8), F16, C(block_n=32, block_k=16, num_splits=5)),  # mixed dtypes, f16 x
    (1, 48, (24, 40, 8), (BF16, I8, F32), F32, C(block_n=16, block_k=64)),       # N, K < block; auto splits
    (5, 130, (96, 32, 32), (BF16,) * 3, BF16, None),                            # auto config
    (16, 256, (64,), (I8,), F32, None),                                          # auto, f32 x, int8
    (40, 96, (48, 16), (BF16, I8), BF16, C(block_n=16, block_k=32, num_splits=2)),  # 17..64 rows: a 64-row tile
    (64, 64, (32,), (BF16,), BF16, None),                                        # M = MAX_ROWS, no row mask
    (48, 256, (512, 192), (BF16,) * 2, BF16, None),   # auto, few programs at 48 rows: 64 x 64 tiles, ragged N
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_against_reference(case):
  M, K, Ns, wd, xd, cfg = CASES[case]
  x, ws, scales = make(case, M, K, Ns, wd, xd)
  out = small_linear(x, ws, scales, config=cfg, interpret=True)
  check(out, x, ws, scales)


def test_scale_on_float_weight_and_no_scale_on_int8():
  x, ws, _ = make(20, 2, 64, (32, 48), (BF16, I8))
  scales = [jax.random.uniform(jax.random.key(3), (32,), F32), None]
  out = small_linear(x, ws, scales, config=C(block_n=16, block_k=16, num_splits=2), interpret=True)
  check(out, x, ws, scales)


def test_under_jit_and_tuple_args():
  x, ws, scales = make(21, 3, 64, (32, 32), (I8, I8))
  f = jax.jit(lambda x, ws, sc: small_linear(x, ws, sc, interpret=True))
  check(f(x, tuple(ws), tuple(scales)), x, ws, scales)


def test_one_pallas_call():
  x, ws, scales = make(22, 5, 64, (96, 32, 32), (BF16, BF16, I8))
  jaxpr = jax.make_jaxpr(lambda x, ws, sc: small_linear(x, ws, sc, interpret=True))(x, ws, scales)
  assert str(jaxpr).count("pallas_call[") == 1, str(jaxpr)


@pytest.mark.parametrize("M,K,Ns,wd,cfg", [
    (1, 300, (70, 33), (I8, I8), C(block_n=32, block_k=64, num_splits=2)),   # ragged N and K, split-K
    (16, 256, (128,), (I8,), None),                                         # auto config, M=16
    (33, 96, (64,), (I8,), C(block_n=32, block_k=32, num_splits=3)),        # 33 rows (a 64-row tile)
    (5, 130, (96, 32, 32), (I8, BF16, I8), None),                           # q/k/v, mixed dtypes
])
def test_transposed_weights(M, K, Ns, wd, cfg):
  """Weights stored [N, K] (`transposed`): the same outputs as the [K, N] layout, alone and mixed with
  untransposed weights in one launch; the split-K partials too."""
  x, ws, scales = make(40 + M, M, K, Ns, wd)
  trans = [i % 2 == 0 for i in range(len(ws))]
  stored = [w.T if t else w for w, t in zip(ws, trans)]
  out = small_linear(x, stored, scales, config=cfg, interpret=True, transposed=trans)
  check(out, x, ws, scales)
  parts = S.small_linear_parts(x, stored, config=cfg, interpret=True, transposed=trans)
  sums = [p.sum(0) * (1.0 if s is None else s) for p, s in zip(parts, scales)]
  check(sums, x, ws, scales)
  with pytest.raises(AssertionError, match="transposed"):
    small_linear(x, stored, scales, interpret=True, transposed=trans[:1] if len(ws) > 1 else [True, True])


@pytest.mark.parametrize("case", [1, 6, 10])   # ragged split-K bf16; mixed dtypes, f16 x; 40 rows
def test_swapped_operands(case):
  """swap_ab (W the left operand of the tile product, a [block_n, R] accumulator transposed before the store)
  forced on and off gives the reference's outputs, in both weight layouts and through the normalising
  prologue; auto (None) swaps only 2-byte x and weights of <= 16 rows."""
  M, K, Ns, wd, xd, cfg = CASES[case]
  x, ws, scales = make(60 + case, M, K, Ns, wd, xd)
  trans = [i % 2 == 1 for i in range(len(ws))]
  stored = [w.T if t else w for w, t in zip(ws, trans)]
  for swap in (True, False):
    c = dataclasses.replace(cfg or C(), swap_ab=swap)
    check(small_linear(x, ws, scales, config=c, interpret=True), x, ws, scales)
    check(small_linear(x, stored, scales, config=c, interpret=True, transposed=trans), x, ws, scales)
  assert S._swap_ab(None, x, ws) == (M <= 16 and jnp.dtype(xd).itemsize == 2
                                     and all(jnp.dtype(d).itemsize == 2 for d in wd))
  assert S._swap_ab(True, x, ws) and not S._swap_ab(False, x, ws)
  # the normalising prologue (x normalised tile by tile from add_stats' statistics) under both orders
  g = jax.random.uniform(jax.random.key(case), (K,), F32, 0.5, 1.5)
  xs = jnp.stack([jnp.sum(x.astype(F32), 1), jnp.sum(jnp.square(x.astype(F32)), 1)])[:, :, None]
  norm = (xs, g, None, "rmsnorm", 1e-6)
  got = [S.small_linear_parts(x, stored, norm=norm, config=dataclasses.replace(cfg or C(), swap_ab=swap),
                              interpret=True, transposed=trans) for swap in (True, False)]
  for a, b in zip(*got):
    np.testing.assert_allclose(np.asarray(a.sum(0)), np.asarray(b.sum(0)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("xd", [BF16, F16])
def test_int8_dequant_variants_are_exact(xd):
  """Every int8 value converts exactly by each method; the kernel's outputs agree bitwise ("asm" runs its
  jnp twin "bits" when interpreted; the PTX itself is lowered in test_triton_lowering and compared on the
  GPU by tests/gpu/check_variants.py)."""
  v = jnp.arange(-128, 128, dtype=jnp.int32).astype(I8)
  for how in ("cvt", "bits"):
    assert bool(jnp.array_equal(S.dequant_int8(v, xd, how), v.astype(xd))), how
  x, ws, scales = make(30, 3, 200, (70, 33), (I8, I8), xd)
  base = small_linear(x, ws, scales, config=C(dequant="cvt", block_n=32, block_k=64), interpret=True)
  check(base, x, ws, scales)
  for how in ("bits", "asm"):
    got = small_linear(x, ws, scales, config=C(dequant=how, block_n=32, block_k=64), interpret=True)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(got, base)), how


def test_choose_config():
  for M, K, Ns, dtype in [(1, 4096, (4096, 1024, 1024), BF16), (16, 1024, (1024,), BF16),
                          (8, 14336, (4096,), I8), (2, 4096, (14336, 14336), BF16),
                          (1, 100, (10,), F32), (16, 8192, (2048,), I8)]:
    cfg = choose_config(M, K, Ns, dtype)
    assert cfg.resolved, cfg
    for v in (cfg.block_n, cfg.block_k):
      assert v >= 16 and v & (v - 1) == 0, cfg
    nkb = -(-K // cfg.block_k)
    per = -(-nkb // cfg.num_splits)
    assert -(-nkb // per) == cfg.num_splits, f"empty split in {cfg}"
    programs = sum(-(-n // cfg.block_n) for n in Ns) * cfg.num_splits
    if K >= 1024:
      assert programs >= 64, (M, K, Ns, cfg, programs)
      assert programs <= 4 * cfg.target_programs, (M, K, Ns, cfg, programs)
      assert cfg.num_splits == 1 or per >= cfg.min_blocks_per_split, cfg
    w_bytes = K * sum(Ns) * jnp.dtype(dtype).itemsize
    assert cfg.block_n * cfg.block_k * jnp.dtype(dtype).itemsize * cfg.num_stages <= S.SMEM_BUDGET
    assert cfg.num_splits * M * sum(Ns) * 4 <= max(cfg.max_partial_fraction * w_bytes,
                                                  S.L2_PARTIAL_BYTES)
  # Set fields are kept; num_splits is clamped to the K-blocks; num_stages to shared memory.
  cfg = choose_config(4, 100, (64,), BF16, C(block_n=32, block_k=16, num_splits=64, num_warps=8))
  assert (cfg.block_n, cfg.block_k, cfg.num_splits, cfg.num_warps) == (32, 16, 7, 8)
  assert choose_config(1, 4096, (4096,), F32, C(block_n=256, block_k=256, num_stages=4)).num_stages == 1


def test_choose_config_wide_x():
  """More than 16 rows: the x tile grows (shared memory counted) and a 2-byte call aims for wide_programs;
  16 rows and fewer keep target_programs, as do int8 calls (their in-kernel norm wants the programs); None
  turns the rule off."""
  wide = choose_config(64, 2048, (6144,), BF16, kmajor=True)
  assert wide.target_programs == S.DEFAULT_CONFIG.wide_programs == 264, wide
  assert choose_config(16, 2048, (6144,), BF16, kmajor=True).target_programs == 528
  assert choose_config(64, 2048, (6144,), BF16, C(wide_programs=None), kmajor=True).target_programs == 528
  wide = choose_config(64, 2048, (6144,), I8, kmajor=True)
  assert wide.target_programs == 528
  assert wide.num_stages * (wide.block_n * wide.block_k + S.tile_rows(64) * wide.block_k * 4) <= S.SMEM_BUDGET
  assert [S.tile_rows(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_choose_config_wide_x_few_programs():
  """A wide 2-byte call whose 16 KB tiles leave fewer than wide_min_programs programs (its splits capped by
  the float32 partials: GPT-350M's projections at 64 rows) takes 64 x 64 tiles and gets more programs for the
  same partial bytes; 16-row, int8 and fixed-tile calls, and wide_min_programs=None, keep the old choice."""
  def programs(c, Ns):
    return sum(-(-n // c.block_n) for n in Ns) * c.num_splits

  for K, Ns in [(1024, (1024,) * 3), (1024, (1024,)), (1024, (4096,)), (4096, (1024,)), (2048, (2048,))]:
    old = choose_config(64, K, Ns, BF16, C(wide_min_programs=None))
    new = choose_config(64, K, Ns, BF16)
    assert programs(old, Ns) < S.DEFAULT_CONFIG.wide_min_programs, (K, Ns, old)
    assert (new.block_n, new.block_k) == (64, 64), (K, Ns, new)
    assert programs(new, Ns) > programs(old, Ns), (K, Ns, old, new)
    assert new.num_splits * 64 * sum(Ns) * 4 <= max(new.max_partial_fraction * K * sum(Ns) * 2, S.L2_PARTIAL_BYTES)
    for M, dtype, cfg, kmajor in [(16, BF16, C(), False), (64, I8, C(), True), (64, BF16, C(block_n=128), False)]:
      assert (choose_config(M, K, Ns, dtype, cfg, kmajor=kmajor)
              == choose_config(M, K, Ns, dtype, dataclasses.replace(cfg, wide_min_programs=None), kmajor=kmajor))
  # enough programs already (1.3B's q/k/v at 64 rows): unchanged
  big = choose_config(64, 2048, (2048,) * 3, BF16)
  assert big == choose_config(64, 2048, (2048,) * 3, BF16, C(wide_min_programs=None))


def test_choose_config_large_int8_calls():
  """int8 calls of >= large_bytes run with large_warps and aim for large_programs; bf16 calls of the
  same size and smaller int8 calls keep num_warps / target_programs; None turns the rule off."""
  K, N = 4096, 8192                                       # 32 MB of int8
  big = choose_config(1, K, (N,), I8, kmajor=True)
  assert (big.num_warps, big.target_programs) == (S.DEFAULT_CONFIG.large_warps, S.DEFAULT_CONFIG.large_programs)
  programs = -(-N // big.block_n) * big.num_splits
  assert programs <= 2 * big.target_programs, big
  for cfg in (choose_config(1, K, (N,), BF16), choose_config(1, K, (N // 2,), I8, kmajor=True),
              choose_config(1, K, (N,), I8, C(large_warps=None, large_programs=None), kmajor=True)):
    assert (cfg.num_warps, cfg.target_programs) == (4, 528), cfg
  assert choose_config(1, K, (N,), I8, C(large_bytes=1 << 40)).num_warps == 4
  # the resolved config runs as it is (the rule is not applied twice)
  assert choose_config(1, K, (N,), I8, big) == big


def test_cuda_lowering_on_cpu():
  """The Triton lowering (jaxpr -> TTIR) runs without a GPU in jaxlib <= 0.10.2 (later jaxlibs
  compile the TTIR in the lowering, which needs the GPU plugin): catches kernel code that
  interprets but does not lower (non-power-of-two loads, unsupported primitives)."""
  from jax._src.lib import version as jaxlib_version
  if jaxlib_version > (0, 10, 2):
    pytest.skip("this jaxlib compiles Triton at lowering time (needs a GPU)")
  for M, K, Ns, wd, xd, cfg in [
      (1, 4096, (4096, 1024, 1024), (BF16,) * 3, BF16, None),           # split-K, masked rows
      (16, 1000, (100, 36), (I8, F16), F16, None),                       # ragged, mixed dtypes
      (16, 512, (256, 128), (I8, I8), BF16, C(num_splits=1)),           # no mask at all, 1 split
      (5, 200, (96,), (F32,), F32, None),                                # f32 (ieee dot)
      (1, 4096, (8192,), (I8,), BF16, None),                             # a large int8 call: 8 warps
      (64, 1024, (3072,), (BF16,), BF16, None)]:                         # 64 rows (a batch-64 decode step)
    x = jnp.zeros((M, K), xd)
    ws = [jnp.zeros((K, n), d) for n, d in zip(Ns, wd)]
    low = jax.jit(lambda x, ws: small_linear(x, ws, config=cfg)).trace(x, ws).lower(
        lowering_platforms=("cuda",))
    assert low.as_text().count("__gpu$xla.gpu.triton") == 1


BAD = [
    # (builder, text the message must contain)
    (lambda x, w: small_linear(x[0], [w]), "x must be [M, K]"),
    (lambda x, w: small_linear(jnp.zeros((65, 64), BF16), [w]), "M=65"),
    (lambda x, w: small_linear(x.astype(jnp.int32), [w]), "x.dtype"),
    (lambda x, w: small_linear(x, w), "ws must be a list"),
    (lambda x, w: small_linear(x, []), "ws must hold 1..3"),
    (lambda x, w: small_linear(x, [w] * 4), "ws must hold 1..3"),
    (lambda x, w: small_linear(x, [w, jnp.zeros((63, 8), BF16)]), "ws[1].shape=(63, 8): its K=63 != K=64"),
    (lambda x, w: small_linear(x, [w, jnp.zeros((64,), BF16)]), "ws[1] must be [K, N]"),
    (lambda x, w: small_linear(x, [w.astype(jnp.int32)]), "ws[0].dtype=int32"),
    (lambda x, w: small_linear(x, [w], [None, None]), "scales has 2 entries"),
    (lambda x, w: small_linear(x, [w], [jnp.ones((31,))]), "scales[0] must be [N]=[32]"),
    (lambda x, w: small_linear(x, [w], [jnp.ones((32,), jnp.int32)]), "scales[0].dtype=int32"),
    (lambda x, w: small_linear(x, [w], config=(32, 32)), "config must be a SmallLinearConfig"),
    (lambda x, w: C(block_n=48), "SmallLinearConfig.block_n=48"),
    (lambda x, w: C(block_k=8), "SmallLinearConfig.block_k=8"),
    (lambda x, w: C(num_splits=0), "SmallLinearConfig.num_splits=0"),
    (lambda x, w: C(num_warps=3), "SmallLinearConfig.num_warps=3"),
    (lambda x, w: C(num_stages=0), "SmallLinearConfig.num_stages=0"),
    (lambda x, w: small_linear_reference(x, [jnp.zeros((8, 8), BF16)]), "ws[0].shape=(8, 8)"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_arguments(case):
  fn, text = BAD[case]
  x, w = jnp.zeros((2, 64), BF16), jnp.zeros((64, 32), BF16)
  with pytest.raises(AssertionError) as e:
    fn(x, w)
  assert text in str(e.value), str(e.value)
