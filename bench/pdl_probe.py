"""Does programmatic dependent launch (PDL) reach ftjax's Pallas kernels? A chain of N dependent small
kernels in one jit (one CUDA graph), timed with the grid-dependency wait off and on
(`ftjax.pallas._common.PDL`), in one process per XLA_FLAGS variant.

    PYTHONUNBUFFERED=1 python bench/pdl_probe.py --chain 256 --programs 132,528 \
        --variants 'default=' 'pdl_off=--xla_gpu_enable_pdl=false'

Per (variant, programs, PDL): µs per kernel (median over reps of the whole chain / N). If XLA launches the
kernels with programmatic stream serialization, the PDL column is lower by the launch latency it hides.
Results as JSON lines.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(a):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from ftjax.pallas import _common as C

    def kern(x_ref, o_ref, *, pdl, width, work):
        dep = C.grid_dependency(pdl)
        i = pl.program_id(0) + dep
        v = C.load(x_ref.at[pl.ds(i * width, width)]) + 1.0
        for _ in range(work):          # a few dependent flops per element: a kernel of some length
            v = v * 1.0001 - 0.0001 * v
        C.store(o_ref.at[pl.ds(i * width, width)], v)

    for programs in [int(p) for p in a.programs.split(",")]:
        for pdl in (False, True, False, True):
            C.PDL = pdl
            jax.clear_caches()
            width = a.width

            def step(x):
                return pl.pallas_call(
                    functools.partial(kern, pdl=C.pdl_on(a.interpret), width=width, work=a.work),
                    grid=(programs,), in_specs=[pl.BlockSpec(x.shape, lambda i: (0,))],
                    out_specs=pl.BlockSpec(x.shape, lambda i: (0,)),
                    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                    compiler_params=C.triton_compiler_params(4, 1), interpret=a.interpret, name="pdl_probe")(x)

            @functools.partial(jax.jit, donate_argnums=0)
            def chain(x):
                for _ in range(a.chain):
                    x = step(x)
                return x

            x = jnp.zeros((programs * width,), jnp.float32)
            x = jax.block_until_ready(chain(x))
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                x = jax.block_until_ready(chain(x))
                ts.append(time.perf_counter() - t0)
            expect = float((a.reps + 1) * a.chain)
            ok = bool(abs(float(x[0]) - expect) / expect < 0.05) if a.work == 0 else None
            row = {"variant": a.name, "programs": programs, "pdl": pdl, "chain": a.chain, "work": a.work,
                   "us_per_kernel": round(statistics.median(ts) / a.chain * 1e6, 3),
                   "min_us_per_kernel": round(min(ts) / a.chain * 1e6, 3), "value_ok": ok,
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            print("ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=256)
    ap.add_argument("--programs", default="132,528")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--work", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", nargs="*", default=["default="])
    ap.add_argument("--interpret", action="store_true", help="CPU smoke: kernels interpreted (no PDL)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--name", default="default")
    a = ap.parse_args()
    if a.child:
        return child(a)
    from bench.step_ab import run_child

    for v in a.variants:
        name, _, flags = v.partition("=")
        run_child(__file__, name, flags, ["--chain", str(a.chain), "--programs", a.programs, "--width", str(a.width),
                                          "--work", str(a.work), "--reps", str(a.reps)]
                  + (["--interpret"] if a.interpret else []))


if __name__ == "__main__":
    main()
