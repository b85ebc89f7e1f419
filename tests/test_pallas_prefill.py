"""Prefill attention kernel (interpret mode on CPU) and the XLA path against the float32 twin.

Interpret mode fills every output buffer with NaN before the kernel runs, so a NaN-free result
also proves every output element was written; K/V past each row's length are NaN, which must
never reach the output. Query rows past a row's length may hold anything finite: they are
checked for finiteness only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.pallas import ops
from ftjax.pallas.prefill_attention import (PrefillConfig, prefill_attention, prefill_attention_packed,
                                            prefill_attention_reference)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def make(seed, b, t, s, n, kh, h, dtype, lengths, bias_rows=None, past=jnp.nan):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), dtype)
  v = jax.random.normal(ks[2], (b, s, kh, h), dtype)
  ln = jnp.asarray(lengths, jnp.int32)
  beyond = jnp.arange(s)[None, :, None, None] >= ln[:, None, None, None]
  bias = (None if bias_rows is None else
          jax.random.normal(ks[3], (bias_rows, n, t, s), jnp.float32))
  return q, jnp.where(beyond, past, k), jnp.where(beyond, past, v), ln, bias


def check(out, ref, lengths, tol, causal_rows_all=False):
  out32, ref32 = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
  assert np.isfinite(out32).all(), "non-finite output (unwritten or NaN leaked from K/V)"
  for i, L in enumerate(np.asarray(lengths)):
    rows = out32.shape[1] if causal_rows_all else min(int(L), out32.shape[1])
    e = np.linalg.norm(out32[i, :rows] - ref32[i, :rows]) / np.linalg.norm(ref32[i, :rows])
    assert e <= tol, f"row {i} (length {L}): rel err {e:.2e} > {tol}"


CASES = [
    # (b, t, s, n, kh, h, dtype, lengths, causal, bias_rows, config)     covers
    (2, 64, 64, 2, 2, 64, jnp.float32, [64, 37], True, None,            # ragged, off-block length
     PrefillConfig(block_q=16, block_k=16)),
    (2, 48, 48, 4, 1, 64, jnp.bfloat16, [1, 48], True, None,            # MQA, length 1 / capacity,
     PrefillConfig(block_q=32, block_k=16)),                            # t padded to the block
    (2, 32, 32, 4, 2, 80, jnp.float16, [32, 19], True, None,            # h=80 masks, GQA
     PrefillConfig(block_q=16, block_k=16)),
    (2, 32, 32, 2, 2, 64, jnp.bfloat16, [32, 9], False, 1, None),       # T5 encoder: bias, no causal
    (2, 16, 48, 2, 2, 64, jnp.float32, [48, 21], False, 2,              # T5 cross: t != s, bias per row
     PrefillConfig(block_q=16, block_k=16)),
    (1, 32, 32, 2, 2, 96, jnp.float32, [30], True, 1,                   # causal + bias, h=96
     PrefillConfig(block_q=16, block_k=16)),
    (1, 256, 256, 1, 1, 64, jnp.bfloat16, [200], True, None,            # 128 x 128 tiles
     PrefillConfig(block_q=128)),
]


def test_few_programs_take_64_query_blocks(monkeypatch):
  """The auto tiles: 128-query blocks; with SMALL_GRID_PROGRAMS on (opt-in), a call of fewer programs (a short
  prompt of one row) takes 64-query blocks on 4 warps; a block_q or num_warps that is set is kept."""
  from ftjax.pallas import prefill_attention as P
  assert P.SMALL_GRID_PROGRAMS == 0 and PrefillConfig().resolve(512, 512, 128, heads=16) == (128, 128, 8, 3)
  monkeypatch.setattr(P, "SMALL_GRID_PROGRAMS", 264)
  assert PrefillConfig().resolve(512, 512, 128, heads=16) == (64, 128, 4, 3)          # 64 programs at 128
  assert PrefillConfig().resolve(512, 512, 128, heads=64 * 16) == (128, 128, 8, 3)    # a batch of 64 rows
  assert PrefillConfig().resolve(512, 512, 128) == (128, 128, 8, 3)                   # heads unknown
  assert PrefillConfig(block_q=128).resolve(512, 512, 128, heads=16) == (128, 128, 8, 3)
  assert PrefillConfig(num_warps=8).resolve(512, 512, 128, heads=16) == (64, 128, 8, 3)
  assert PrefillConfig().resolve(64, 64, 128, heads=16) == (64, 64, 8, 3)              # already 64
  # the kernel on those tiles (few programs, the auto config) against the reference
  q, k, v, ln, _ = make(7, 1, 256, 256, 2, 1, 64, jnp.bfloat16, [256])
  check(prefill_attention(q, k, v, ln, interpret=True), prefill_attention_reference(q, k, v, ln), [256],
        TOL[jnp.bfloat16])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefill_kernel_matches_reference(case):
  b, t, s, n, kh, h, dtype, lengths, causal, bias_rows, config = CASES[case]
  q, k, v, ln, bias = make(case, b, t, s, n, kh, h, dtype, lengths, bias_rows)
  out = prefill_attention(q, k, v, ln, causal=causal, bias=bias, config=config, interpret=True)
  ref = prefill_attention_reference(q, k, v, ln, causal=causal, bias=bias)
  assert out.shape == (b, t, n, h) and out.dtype == q.dtype
  check(out, ref, lengths, TOL[dtype])


def test_reference_matches_numpy():
  q, k, v, ln, bias = make(5, 1, 6, 6, 2, 1, 4, jnp.float32, [5], bias_rows=1, past=0.0)
  ref = np.asarray(prefill_attention_reference(q, k, v, ln, causal=True, bias=bias))
  qn, kn, vn, bn = (np.asarray(x, np.float64) for x in (q, k, v, bias))
  for ni in range(2):
    for i in range(6):
      L = min(5, i + 1)
      lg = kn[0, :L, 0] @ qn[0, i, ni] / 2.0 + bn[0, ni, i, :L]
      p = np.exp(lg - lg.max())
      p /= p.sum()
      np.testing.assert_allclose(ref[0, i, ni], p @ vn[0, :L, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,bias_rows,dtype", [(True, None, jnp.float32),
                                                    (True, None, jnp.bfloat16),
                                                    (False, 2, jnp.float16),
                                                    (True, 1, jnp.float32)])
def test_xla_prefill_matches_reference(causal, bias_rows, dtype):
  q, k, v, ln, bias = make(21, 2, 24, 24, 4, 2, 32, dtype, [24, 7], bias_rows, past=3.0)
  out = ops.attention_prefill(q, k, v, ln, impl="xla", causal=causal, bias=bias)
  check(out, prefill_attention_reference(q, k, v, ln, causal=causal, bias=bias), ln, TOL[dtype])


def test_ops_pallas_prefill_runs_kernel_on_cpu():
  q, k, v, ln, _ = make(22, 2, 32, 32, 2, 2, 64, jnp.float32, [32, 11])
  out = ops.attention_prefill(q, k, v, ln, impl="pallas")
  check(out, prefill_attention_reference(q, k, v, ln), ln, 1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: ops.attention_prefill(*a, impl="pallas"))(q, k, v, ln))
  assert "pallas_call" in jaxpr


def test_custom_scale_non_causal():
  q, k, v, ln, _ = make(23, 1, 16, 16, 2, 2, 64, jnp.float32, [12])
  out = prefill_attention(q, k, v, ln, scale=1.0, causal=False, interpret=True)
  check(out, prefill_attention_reference(q, k, v, ln, scale=1.0, causal=False), ln, 1e-5)


def test_bad_shapes_name_the_sizes():
  q, k, v, ln, _ = make(0, 2, 16, 16, 6, 4, 16, jnp.float32, [4, 4])
  with pytest.raises(AssertionError, match="n=6.*k=4"):
    prefill_attention(q, k, v, ln, interpret=True)
  q, k, v, ln, _ = make(0, 2, 16, 16, 4, 4, 16, jnp.float32, [4, 4])
  with pytest.raises(AssertionError, match="bias"):
    prefill_attention(q, k, v, ln, bias=jnp.zeros((3, 4, 16, 16)), interpret=True)
  with pytest.raises(AssertionError, match="block_q=48"):
    PrefillConfig(block_q=48)


PACKED = [
    # (b, t, n, kh, h, dtype, lengths, config)                     covers
    (2, 40, 4, 2, 80, jnp.float16, [40, 17],                       # GQA, h=80 masks, t padded (block_q > block_k)
     PrefillConfig(block_q=32, block_k=16)),
    (2, 24, 4, 1, 64, jnp.bfloat16, [1, 24],                       # MQA, length 1, block_k > block_q
     PrefillConfig(block_q=16, block_k=32)),
    (1, 64, 2, 2, 32, jnp.float32, [50], None),                    # the auto tiles
]


@pytest.mark.parametrize("case", range(len(PACKED)))
def test_packed_kernel_matches_reference(case):
  """q, K and V read in place from one [b, t, n + 2k, h] array (a fused projection's output) give the
  reference's attention of the three heads groups split out; K/V past each row's length are NaN."""
  b, t, n, kh, h, dtype, lengths, config = PACKED[case]
  q, k, v, ln, _ = make(40 + case, b, t, t, n, kh, h, dtype, lengths)
  qkv = jnp.concatenate([q, k, v], axis=2)
  out = prefill_attention_packed(qkv, ln, num_heads=n, kv_heads=kh, config=config, interpret=True)
  assert out.shape == (b, t, n, h) and out.dtype == dtype
  check(out, prefill_attention_reference(q, k, v, ln), lengths, TOL[dtype])
  q, k, v, ln, _ = make(40 + case, b, t, t, n, kh, h, dtype, lengths, past=3.0)   # XLA's path: finite K/V
  via_ops = ops.attention_prefill_packed(jnp.concatenate([q, k, v], axis=2), n, kh, ln, impl="xla")
  check(via_ops, prefill_attention_reference(q, k, v, ln), lengths, TOL[dtype])


def test_packed_bad_heads_name_the_sizes():
  qkv = jnp.zeros((2, 16, 7, 16), jnp.float32)
  with pytest.raises(AssertionError, match="7 heads.*= 8"):
    prefill_attention_packed(qkv, jnp.array([4, 4]), num_heads=4, kv_heads=2, interpret=True)
  with pytest.raises(AssertionError, match="n=3.*k=2"):
    prefill_attention_packed(qkv, jnp.array([4, 4]), num_heads=3, kv_heads=2, interpret=True)
