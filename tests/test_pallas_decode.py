"""Decode attention kernel (interpret mode on CPU) and the XLA path against the float32 twin.

Interpret mode fills every output buffer with NaN before the kernel runs, so a NaN-free result
also proves every output element was written; the cache past each row's length is filled with
NaN, which must never reach the output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.pallas import ops
from ftjax.pallas.decode_attention import (DecodeConfig, choose_num_splits, decode_attention,
                                           decode_attention_reference)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def make(seed, b, n, kh, s, h, dtype, lengths, past=jnp.nan):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, n, h), dtype)
  kc = jax.random.normal(ks[1], (b, kh, s, h), dtype)
  vc = jax.random.normal(ks[2], (b, kh, s, h), dtype)
  ln = jnp.asarray(lengths, jnp.int32)
  beyond = jnp.arange(s)[None, None, :, None] >= ln[:, None, None, None]
  return q, jnp.where(beyond, past, kc), jnp.where(beyond, past, vc), ln


def rel_err(out, ref):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  ref = np.asarray(ref.astype(jnp.float32), np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def check_rows(out, ref, tol):
  """Every row finite and each row close on its own (a wrong row cannot hide in the norm)."""
  out32, ref32 = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
  assert np.isfinite(out32).all(), "non-finite output (unwritten or NaN leaked from the cache)"
  for i in range(out32.shape[0]):
    e = np.linalg.norm(out32[i] - ref32[i]) / np.linalg.norm(ref32[i])
    assert e <= tol, f"row {i}: rel err {e:.2e} > {tol}"


CASES = [
    # (b, n, kh, s, h, dtype, lengths, config)                 what it covers
    (3, 4, 4, 64, 64, jnp.float32, [1, 64, 37], None),           # MHA: length 1, = capacity, off-block
    (2, 8, 2, 64, 128, jnp.bfloat16, [64, 20], None),            # GQA 4, bf16
    (2, 8, 1, 48, 64, jnp.float16, [48, 17], None),              # MQA, fp16, s off 32
    (2, 6, 2, 32, 80, jnp.float32, [3, 32], None),               # h=80 padded by masks, GQA 3
    (2, 4, 4, 32, 96, jnp.bfloat16, [32, 31], None),             # h=96
    (1, 2, 2, 40, 64, jnp.float32, [40], None),                  # capacity not multiple of 16
    (3, 4, 4, 128, 64, jnp.float32, [128, 1, 70],                # split-K, empty splits in row 1
     DecodeConfig(block_k=16, num_splits=5)),
    (2, 8, 2, 128, 64, jnp.bfloat16, [100, 128],                 # split-K on the dot path
     DecodeConfig(block_k=32, num_splits=3)),
    (2, 4, 4, 64, 64, jnp.float32, [64, 9],                      # MHA forced onto the dot path
     DecodeConfig(block_k=16, mha_dot=True)),
    (1, 2, 2, 32, 256, jnp.bfloat16, [30], None),                # h=256
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_kernel_matches_reference(case):
  b, n, kh, s, h, dtype, lengths, config = CASES[case]
  q, kc, vc, ln = make(case, b, n, kh, s, h, dtype, lengths)
  out = decode_attention(q, kc, vc, ln, config=config, interpret=True)
  ref = decode_attention_reference(q, kc, vc, ln)
  assert out.shape == (b, n, h) and out.dtype == q.dtype
  check_rows(out, ref, TOL[dtype])


def test_decode_custom_scale():
  q, kc, vc, ln = make(99, 2, 4, 2, 32, 64, jnp.float32, [32, 5])
  out = decode_attention(q, kc, vc, ln, scale=1.0, interpret=True)
  check_rows(out, decode_attention_reference(q, kc, vc, ln, scale=1.0), 1e-5)


def test_reference_matches_numpy_softmax():
  """The twin itself, against an independent float64 numpy computation."""
  q, kc, vc, ln = make(7, 2, 4, 2, 16, 8, jnp.float32, [16, 3], past=0.0)
  ref = np.asarray(decode_attention_reference(q, kc, vc, ln))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, kc, vc))
  for bi, L in enumerate([16, 3]):
    for ni in range(4):
      kv = ni // 2
      lg = kn[bi, kv, :L] @ qn[bi, ni] / np.sqrt(8)
      p = np.exp(lg - lg.max())
      p /= p.sum()
      np.testing.assert_allclose(ref[bi, ni], p @ vn[bi, kv, :L], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_xla_decode_matches_reference(dtype):
  # The XLA path needs finite cache contents past the length (the engine's cache is).
  q, kc, vc, ln = make(11, 3, 8, 2, 48, 64, dtype, [1, 48, 30], past=5.0)
  out = ops.attention_decode(q, kc, vc, ln, impl="xla")
  check_rows(out, decode_attention_reference(q, kc, vc, ln), TOL[dtype])


def test_ops_pallas_decode_runs_kernel_on_cpu():
  q, kc, vc, ln = make(12, 2, 4, 4, 32, 64, jnp.float32, [32, 7])
  out = ops.attention_decode(q, kc, vc, ln, impl="pallas")
  check_rows(out, decode_attention_reference(q, kc, vc, ln), 1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: ops.attention_decode(*a, impl="pallas"))(q, kc, vc, ln))
  assert "pallas_call" in jaxpr          # the kernel (interpreted), never the XLA fallback
  jaxpr = str(jax.make_jaxpr(lambda *a: ops.attention_decode(*a, impl="xla"))(q, kc, vc, ln))
  assert "pallas_call" not in jaxpr


def test_resolve_impl():
  assert ops.resolve_impl("xla") == "xla"
  assert ops.resolve_impl("pallas") == "pallas"
  assert ops.resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
  with pytest.raises(ValueError, match="attention"):
    ops.resolve_impl("flash")
  with pytest.raises(ValueError, match="impl"):
    ops.attention_decode(*make(0, 1, 2, 2, 16, 16, jnp.float32, [4]), impl="auto")


def test_bad_shapes_name_the_sizes():
  q, kc, vc, ln = make(0, 2, 6, 4, 16, 16, jnp.float32, [4, 4])
  with pytest.raises(AssertionError, match="n=6.*k=4"):
    decode_attention(q, kc, vc, ln, interpret=True)
  with pytest.raises(AssertionError, match="lengths"):
    decode_attention(q[:, :4], kc, vc, ln[:1], interpret=True)
  with pytest.raises(AssertionError, match="block_k=24"):
    DecodeConfig(block_k=24)
  with pytest.raises(AssertionError, match="small_head_warps=3"):
    DecodeConfig(small_head_warps=3)


def test_num_splits_heuristic():
  cfg = DecodeConfig()
  assert choose_num_splits(cfg, 128, 32, 8192, 128) == 1          # big batch fills the GPU
  assert choose_num_splits(cfg, 1, 16, 8192, 128) == 32            # small batch splits K
  assert choose_num_splits(cfg, 1, 16, 128, 128) == 1              # one block: no split
  assert choose_num_splits(DecodeConfig(num_splits=4), 1, 1, 8192, 128) == 4
