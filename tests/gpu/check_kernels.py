"""Every Pallas kernel against its float32 twin, on the GPU (compiled, not interpreted).

  PYTHONUNBUFFERED=1 python tests/gpu/check_kernels.py [--quick]

Fresh random inputs per case (seeded by the case index), edge shapes (length 1, length =
capacity, lengths off the block size, mixed lengths, GQA / MQA, head_dim 64/80/96/128/256,
capacities off 16, fp32 / bf16 / fp16), NaN written into the cache past each row's length (it
must never reach the output), and the output buffer poisoned before the call (a NaN buffer of
the output's size is allocated and freed right before, so the allocator hands the kernel that
memory: any element the kernel does not write stays NaN). Prints one PASS/FAIL line a case and
exits non-zero on any failure. Also checks that the compiled program of a call through
`ftjax.pallas.ops` with impl="pallas" holds the kernel's custom call.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.pallas import ops
from ftjax.pallas.decode_attention import (DecodeConfig, decode_attention,
                                           decode_attention_reference)
from ftjax.pallas.prefill_attention import (PrefillConfig, prefill_attention,
                                            prefill_attention_reference)

TOL = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
FAILS = []
INTERPRET = "--interpret" in sys.argv   # CPU smoke test of this script itself


def rel_err(out, ref, row_mask=None):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  ref = np.asarray(ref.astype(jnp.float32), np.float64)
  if row_mask is not None:
    out, ref = out * row_mask, ref * row_mask
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poison(shape, dtype):
  x = jnp.full(shape, jnp.nan, dtype)
  x.block_until_ready()
  x.delete()


def report(name, err, tol, finite):
  ok = finite and err <= tol
  print(f"{'PASS' if ok else 'FAIL'} {name}: rel_err={err:.2e} tol={tol:.0e} finite={finite}",
        flush=True)
  if not ok:
    FAILS.append(name)


def check_decode(i, b, n, kh, s, h, dtype, lengths, config=None):
  name = f"decode b={b} n={n} k={kh} s={s} h={h} {jnp.dtype(dtype).name} lengths={lengths} {config}"
  try:
    ks = jax.random.split(jax.random.key(1000 + i), 3)
    q = jax.random.normal(ks[0], (b, n, h), dtype)
    kc = jax.random.normal(ks[1], (b, kh, s, h), dtype)
    vc = jax.random.normal(ks[2], (b, kh, s, h), dtype)
    ln = jnp.asarray(lengths, jnp.int32)
    past = jnp.arange(s)[None, None, :, None] >= ln[:, None, None, None]
    kc, vc = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.nan, vc)
    ref = decode_attention_reference(q, kc, vc, ln)
    poison((b, n, h), dtype)
    out = decode_attention(q, kc, vc, ln, config=config, interpret=INTERPRET)
    report(name, rel_err(out, ref), TOL[dtype], bool(jnp.isfinite(out).all()))
  except Exception as e:  # noqa: BLE001
    print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    FAILS.append(name)


def check_prefill(i, b, t, s, n, kh, h, dtype, lengths, causal=True, bias_rows=None, config=None):
  name = (f"prefill b={b} t={t} s={s} n={n} k={kh} h={h} {jnp.dtype(dtype).name} "
          f"lengths={lengths} causal={causal} bias={bias_rows} {config}")
  try:
    ks = jax.random.split(jax.random.key(2000 + i), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, h), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, h), dtype)
    ln = jnp.asarray(lengths, jnp.int32)
    past = jnp.arange(s)[None, :, None, None] >= ln[:, None, None, None]
    k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    bias = (None if bias_rows is None else
            jax.random.normal(ks[3], (bias_rows, n, t, s), jnp.float32))
    ref = prefill_attention_reference(q, k, v, ln, causal=causal, bias=bias)
    poison((b, t, n, h), dtype)
    out = prefill_attention(q, k, v, ln, causal=causal, bias=bias, config=config,
                            interpret=INTERPRET)
    # Rows past the length may hold anything finite: compare rows < length only.
    rows = (np.arange(t)[None, :] < np.asarray(ln)[:, None])[:, :, None, None]
    report(name, rel_err(out, ref, rows), TOL[dtype], bool(jnp.isfinite(out).all()))
  except Exception as e:  # noqa: BLE001
    print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    FAILS.append(name)


def check_custom_call():
  """The compiled program of ops.attention_* with impl='pallas' must hold the Triton call."""
  q = jnp.ones((2, 16, 64), jnp.bfloat16)
  kc = jnp.ones((2, 16, 256, 64), jnp.bfloat16)
  ln = jnp.array([3, 256], jnp.int32)
  for name, f, args in [
      ("decode", lambda q, k, v, l: ops.attention_decode(q, k, v, l, impl="pallas"), (q, kc, kc, ln)),
      ("prefill", lambda q, k, v, l: ops.attention_prefill(q, k, v, l, impl="pallas"),
       (jnp.ones((2, 256, 16, 64), jnp.bfloat16),) * 3 + (ln,))]:
    hlo = jax.jit(f).lower(*args).compile().as_text()
    ok = "ftjax_" + name + "_attention" in hlo or "xla.gpu.triton" in hlo
    print(f"{'PASS' if ok else 'FAIL'} compiled ops.attention_{name}(impl='pallas') holds the "
          f"Pallas/Triton custom call", flush=True)
    if not ok:
      FAILS.append("custom_call " + name)


def main():
  quick = "--quick" in sys.argv
  print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  bf, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
  i = 0
  dec = [
      (4, 16, 16, 512, 128, bf, [1, 512, 129, 300], None),
      (4, 16, 16, 2048, 64, bf, [2048, 1, 1000, 77], None),
      (3, 32, 8, 1024, 128, bf, [1024, 513, 1], None),             # GQA 4
      (2, 32, 1, 640, 128, f16, [640, 5], None),                    # MQA
      (2, 8, 8, 1000, 80, f32, [999, 1000], None),                  # h=80, s not multiple of 128
      (2, 12, 4, 256, 96, bf, [17, 256], None),                     # h=96, GQA 3
      (2, 8, 2, 512, 256, bf, [300, 512], None),                    # h=256
      (2, 16, 16, 8192, 128, bf, [8192, 4097], None),               # long, split-K
      (1, 16, 16, 4096, 128, f32, [4000], DecodeConfig(num_splits=1)),
      (2, 16, 4, 4096, 64, f16, [4096, 3000], DecodeConfig(num_splits=7, block_k=64)),
      (128, 16, 16, 256, 64, bf, list(range(1, 257, 2)), None),    # big batch, mixed lengths
      (2, 4, 4, 40, 64, bf, [1, 40], None),                         # capacity not multiple of 16
  ]
  if quick:
    dec = dec[:4]
  for c in dec:
    check_decode(i, *c)
    i += 1
  pre = [
      (2, 512, 512, 16, 16, 128, bf, [512, 300], True, None, None),
      (2, 1024, 1024, 32, 8, 64, bf, [1, 1024], True, None, None),   # GQA, length 1
      (2, 300, 300, 8, 8, 80, f16, [300, 129], True, None, None),    # t off block, h=80
      (1, 2048, 2048, 8, 2, 128, f32, [2000], True, None, None),
      (2, 512, 512, 8, 8, 64, bf, [512, 200], False, 1, None),       # T5 encoder bias
      (2, 128, 512, 8, 8, 64, bf, [512, 33], False, 2, None),        # T5 cross attention
      (2, 256, 256, 8, 8, 64, f32, [256, 100], True, 1, None),       # T5 decoder self (causal + bias)
      (2, 512, 512, 4, 4, 96, bf, [512, 511], True, None, PrefillConfig(block_q=64, block_k=32)),
      (1, 256, 256, 4, 1, 256, bf, [256], True, None, None),         # h=256, MQA
  ]
  if quick:
    pre = pre[:3]
  for c in pre:
    check_prefill(i, *c)
    i += 1
  try:
    if not INTERPRET:
      check_custom_call()
  except Exception as e:  # noqa: BLE001
    print(f"FAIL custom call check: {type(e).__name__}: {str(e)[:400]}", flush=True)
    FAILS.append("custom_call")
  print(f"{len(FAILS)} failure(s)" + (": " + "; ".join(FAILS) if FAILS else ""), flush=True)
  sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
  main()
