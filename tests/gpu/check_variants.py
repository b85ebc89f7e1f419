"""GPU check of the small-M kernel's variants (run on the device; CPU CI covers them interpreted / lowered):

  python tests/gpu/check_variants.py

- int8 dequantisation: "asm" and "bits" against "cvt" (all exact conversions, same products: the outputs
  must be bitwise equal), bf16 and f16 x, ragged shapes, every int8 value present in the weights;
- the normalising projection with the norm at the end of the loop ("end") against the float32 norm
  followed by a float32 product, beside "tile" (both within bf16 rounding of the input).
Prints PASS / FAIL lines and exits 1 on a failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.pallas.add_norm import add_stats, norm_from_stats
from ftjax.pallas.small_linear import SmallLinearConfig, small_linear, small_linear_parts

FAILS = []


def report(name, ok, detail=""):
    print(("PASS " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""), flush=True)
    if not ok:
        FAILS.append(name)


def main():
    rng = np.random.RandomState(0)
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
    for M, D, kind, beta, wdt in [(1, 2048, "layernorm", True, jnp.bfloat16), (3, 1024, "rmsnorm", False, jnp.bfloat16),
                                  (2, 2048, "layernorm", True, jnp.int8), (14, 1000, "layernorm", True, jnp.bfloat16)]:
        x = jnp.asarray(rng.randn(M, D) * 2 + 0.3, jnp.bfloat16)
        xo, st = add_stats(x)
        g = jnp.asarray(rng.randn(D), jnp.bfloat16)
        b = jnp.asarray(rng.randn(D), jnp.bfloat16) if beta else None
        if wdt == jnp.int8:
            w = jnp.asarray(rng.randint(-127, 128, (D, 768)), jnp.int8)
        else:
            w = jnp.asarray(rng.randn(D, 768) * 0.05, jnp.bfloat16)
        xf = xo.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True) if kind == "layernorm" else 0.0
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        h = (xf - mean) * jax.lax.rsqrt(var + 1e-5) * g.astype(jnp.float32)
        h = h + b.astype(jnp.float32) if b is not None else h
        ref = jnp.dot(h, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        mag = jnp.dot(jnp.abs(h), jnp.abs(w.astype(jnp.float32)), precision=jax.lax.Precision.HIGHEST)
        errs = {}
        for at in ("tile", "end"):
            p = small_linear_parts(xo, [w], norm=(st, g, b, kind, 1e-5), config=SmallLinearConfig(norm_at=at))[0]
            errs[at] = float(jnp.max(jnp.abs(p.sum(0) - ref) / mag))
        report(f"norm at end M={M} D={D} {kind} beta={beta} {jnp.dtype(wdt).name}",
               errs["end"] < 4 * max(errs["tile"], 2 ** -9), f"err/|x||w|: tile {errs['tile']:.3g} end {errs['end']:.3g}")
    print(f"{'FAIL' if FAILS else 'ALL PASS'}: {len(FAILS)} failed", flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
