"""GPU check of the small-M kernel's variants (run on the device; CPU CI covers them interpreted / lowered):

  python tests/gpu/check_variants.py [--swap]   (--swap: only the swap_ab check)

- int8 dequantisation: "asm" and "bits" against "cvt" (all exact conversions, same products: the outputs
  must be bitwise equal), bf16 and f16 x, ragged shapes, every int8 value present in the weights;
- int8 weights stored transposed ([N, K], `transposed=`) against the [K, N] layout;
- large int8 calls (8 warps, `SmallLinearConfig.large_*`) against the rule off and a float32 product;
- x of 17..64 rows (the batch-64 decode step's int8 projections) against a float32 product.
Prints PASS / FAIL lines and exits 1 on a failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax.numpy as jnp
import numpy as np

from ftjax.pallas.small_linear import SmallLinearConfig, small_linear

FAILS = []


def report(name, ok, detail=""):
    print(("PASS " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""), flush=True)
    if not ok:
        FAILS.append(name)


def inputs(rng, M, K, Ns, wdt):
    """bf16 x [M, K]; weights [K, N] (int8 with per-channel scales, or bf16 without); their float32 products."""
    x = jnp.asarray(rng.randn(M, K), jnp.bfloat16)
    if wdt == "int8":
        ws = [jnp.asarray(rng.randint(-128, 128, (K, n)), jnp.int8) for n in Ns]
        sc = [jnp.asarray(rng.rand(n) + 0.5, jnp.float32) for n in Ns]
    else:
        ws = [jnp.asarray(rng.randn(K, n) * 0.05, jnp.bfloat16) for n in Ns]
        sc = [None] * len(Ns)
    xf = np.asarray(x, np.float32)
    ref = [xf @ (np.asarray(w, np.float32) * (1.0 if s is None else np.asarray(s))) for w, s in zip(ws, sc)]
    return x, ws, sc, ref


def finish():
    print(f"{'FAIL' if FAILS else 'ALL PASS'}: {len(FAILS)} failed", flush=True)
    sys.exit(1 if FAILS else 0)


def check_swap(rng):
    """W as the product's left operand (SmallLinearConfig.swap_ab: 64-row tiles, Hopper's wgmma) against the
    default and a float32 product: bf16 and int8 weights, both layouts, ragged shapes, 1..64 rows."""
    for M, K, Ns, wdt in [(1, 2048, (2048, 2048, 2048), "bf16"), (1, 8192, (2048,), "int8"),
                          (5, 1000, (300, 17), "bf16"), (16, 4100, (1030,), "int8"), (40, 1024, (4096,), "bf16"),
                          (64, 2048, (2048, 2048, 2048), "int8")]:
        x, ws, sc, ref = inputs(rng, M, K, Ns, wdt)
        for t in ((False, True) if wdt == "int8" else (False,)):
            wl, tr = ([w.T for w in ws] if t else ws), [t] * len(ws)
            base = small_linear(x, wl, sc, transposed=tr)
            got = small_linear(x, wl, sc, transposed=tr, config=SmallLinearConfig(swap_ab=True))
            fin = all(bool(jnp.isfinite(a).all()) for a in got)
            rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, base))
            rref = max(float(np.max(np.abs(np.asarray(a) - r)) / np.max(np.abs(r))) for a, r in zip(got, ref))
            report(f"swap_ab M={M} K={K} Ns={Ns} {wdt} transposed={t} == default, float32", fin and rel < 1e-5
                   and rref < 1e-5, f"max rel diff {rel:.3g}, vs float32 {rref:.3g}")


def main():
    rng = np.random.RandomState(0)
    if sys.argv[1:] == ["--swap"]:
        check_swap(rng)
        finish()
    for M, K, Ns, xdt in [(1, 2048, (2048, 2048, 2048), jnp.bfloat16), (5, 1000, (300, 17), jnp.bfloat16),
                          (16, 4100, (1030,), jnp.float16), (2, 8192, (2048,), jnp.bfloat16)]:
        x = jnp.asarray(rng.randn(M, K), xdt)
        ws = [jnp.asarray(rng.randint(-128, 128, (K, n)), jnp.int8) for n in Ns]
        sc = [jnp.asarray(rng.rand(n) + 0.5, jnp.float32) for n in Ns]
        base = small_linear(x, ws, sc, config=SmallLinearConfig(dequant="cvt"))
        for how in ("bits", "asm"):
            got = small_linear(x, ws, sc, config=SmallLinearConfig(dequant=how))
            same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, base))
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, base))
            report(f"dequant {how} == cvt M={M} K={K} Ns={Ns} {jnp.dtype(xdt).name}", same, f"max diff {diff:.3g}")
    # int8 stored transposed ([N, K]) against the [K, N] layout: the same products, summed in tiles of
    # another shape, so held to float32 rounding of the magnitude, not bitwise.
    for M, K, Ns in [(1, 2048, (2048, 2048, 2048)), (5, 1000, (300, 17)), (16, 4100, (1030,))]:
        x = jnp.asarray(rng.randn(M, K), jnp.bfloat16)
        ws = [jnp.asarray(rng.randint(-128, 128, (K, n)), jnp.int8) for n in Ns]
        sc = [jnp.asarray(rng.rand(n) + 0.5, jnp.float32) for n in Ns]
        base = small_linear(x, ws, sc)
        got = small_linear(x, [w.T for w in ws], sc, transposed=[True] * len(ws))
        rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, base))
        fin = all(bool(jnp.isfinite(a).all()) for a in got)
        report(f"int8 transposed == [K, N] M={M} K={K} Ns={Ns}", fin and rel < 1e-5, f"max rel diff {rel:.3g}")
    # Large int8 calls (>= SmallLinearConfig.large_bytes) run with 8 warps and fewer programs: against the
    # same call with the rule off (4 warps, the usual split) and a float32 product, both layouts.
    for M, K, Ns in [(1, 4096, (4096, 4096, 4096)), (3, 16384, (4096,))]:
        x = jnp.asarray(rng.randn(M, K), jnp.bfloat16)
        ws = [jnp.asarray(rng.randint(-128, 128, (K, n)), jnp.int8) for n in Ns]
        sc = [jnp.asarray(rng.rand(n) + 0.5, jnp.float32) for n in Ns]
        ref = [np.asarray(x, np.float32) @ (np.asarray(w, np.float32) * np.asarray(s)) for w, s in zip(ws, sc)]
        off = SmallLinearConfig(large_warps=None, large_programs=None)
        for t in (False, True):
            wl = [w.T for w in ws] if t else ws
            tr = [t] * len(ws)
            got = small_linear(x, wl, sc, transposed=tr)
            base = small_linear(x, wl, sc, config=off, transposed=tr)
            rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, base))
            rref = max(float(np.max(np.abs(np.asarray(a) - r)) / np.max(np.abs(r))) for a, r in zip(got, ref))
            report(f"large int8 call (8 warps) == 4 warps, float32 M={M} K={K} Ns={Ns} transposed={t}",
                   rel < 1e-5 and rref < 1e-5, f"max rel diff {rel:.3g}, vs float32 {rref:.3g}")
    # Wide x (17..64 rows: a batch-64 decode step; the x tile grows to 32 / 64 rows, wide_programs): against a
    # float32 product, int8 in both layouts and bf16 weights, ragged shapes, memory poisoned by earlier calls.
    for M, K, Ns, wdt in [(64, 2048, (2048, 2048, 2048), "int8"), (40, 1000, (300, 17), "int8"),
                          (64, 1024, (4096,), "bf16"), (17, 4100, (1030,), "int8")]:
        x, ws, sc, ref = inputs(rng, M, K, Ns, wdt)
        for t in ((False, True) if wdt == "int8" else (False,)):
            got = small_linear(x, [w.T for w in ws] if t else ws, sc, transposed=[t] * len(ws))
            fin = all(bool(jnp.isfinite(a).all()) for a in got)
            rref = max(float(np.max(np.abs(np.asarray(a) - r)) / np.max(np.abs(r))) for a, r in zip(got, ref))
            report(f"wide x M={M} K={K} Ns={Ns} {wdt} transposed={t} == float32", fin and rref < 1e-5,
                   f"max rel diff {rref:.3g}")
    finish()


if __name__ == "__main__":
    main()
