"""The prefill's MLP-in projection with its GELU: XLA's way (cuBLAS GEMM, bias in its epilogue, the product rounded
to bf16, then the activation as a float32 pass of its own; what `ftjax.layers.mlp.MLP` runs) beside the Pallas GEMM
that applies bias and GELU before its one store (ftjax/pallas/gemm_act.py), over a few tile configurations.

    PYTHONUNBUFFERED=1 python bench/gemm_act.py [--shapes 350m-b64-128,1.3b-b64-512,1.3b-b1-512] [--json FILE]
    python bench/gemm_act.py --smoke      # CPU: tiny shapes, interpret mode

Each row: the XLA pair's and each config's time per call (GPU kernels' busy time from a profiler trace over
rotated inputs, `bench/common.py`'s kernel_time_call), TFLOP/s of the GEMM's 2*M*K*N, the ratio to XLA's time, and
the max abs error of both against a float32 reference. The switch the model reads is `mlp.GELU_GEMM` (whole
requests: `bash bench/s24_gpu.sh gelu`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {   # name: (M tokens, K hidden, N ffn)
    "350m-b64-128": (8192, 1024, 4096),
    "350m-b64-512": (32768, 1024, 4096),
    "1.3b-b64-128": (8192, 2048, 8192),
    "1.3b-b64-512": (32768, 2048, 8192),
    "1.3b-b1-512": (512, 2048, 8192),
}
CONFIGS = {  # name: GemmConfig fields
    "default": {},
    "128x128x64 w4 s4": dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
    "128x256x64 w8 s4": dict(num_stages=4),
    "256x128x64 w8 s3": dict(block_m=256, block_n=128),
    "128x256x32 w8 s4": dict(block_k=32, num_stages=4),
    "64x256x64 w4 s4": dict(block_m=64, num_warps=4, num_stages=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="350m-b64-128,1.3b-b64-512,1.3b-b1-512")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.common import device_info, kernel_time_call, n_rotations, time_call
    from ftjax.layers.mlp import activation
    from ftjax.pallas._common import default_interpret
    from ftjax.pallas.gemm_act import GemmConfig, linear_act, linear_act_reference

    interpret = default_interpret()
    shapes = {"smoke": (40, 64, 256)} if a.smoke else {k: SHAPES[k] for k in a.shapes.split(",")}
    configs = {k: CONFIGS[k] for k in a.configs.split(",")}
    print(f"# {device_info()}, jax {jax.__version__}", flush=True)
    rows = []

    def xla(x, w, b):   # the model's path: 16-bit product + bias (cuBLAS epilogue), then GELU in float32
        y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=x.dtype) + b
        return activation("gelu_tanh", y.astype(jnp.float32)).astype(x.dtype)

    for name, (M, K, N) in shapes.items():
        key = jax.random.key(0)
        kx, kw, kb = jax.random.split(key, 3)
        per_set = (M * K + K * N) * 2
        sets = 1 if a.smoke else n_rotations(per_set, cap=4)
        args = [(jax.random.normal(jax.random.fold_in(kx, i), (M, K), jnp.bfloat16),
                 (jax.random.normal(jax.random.fold_in(kw, i), (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16),
                 jax.random.normal(kb, (N,), jnp.bfloat16)) for i in range(sets)]
        ref = np.asarray(linear_act_reference(*args[0], activation="gelu_tanh"), np.float32)
        flop = 2.0 * M * K * N
        timer = time_call if interpret else kernel_time_call

        def measure(fn):
            t, out = timer(fn, args, reps=3) if interpret else timer(fn, args)
            err = float(np.max(np.abs(np.asarray(out[0], np.float32) - ref)))
            return t, err

        t_xla, e_xla = measure(xla)
        base = {"shape": name, "M": M, "K": K, "N": N, "device": device_info(), "jax": jax.__version__}
        rows.append(base | {"impl": "xla", "us": t_xla * 1e6, "tflops": flop / t_xla / 1e12, "max_err": e_xla})
        print(json.dumps(rows[-1]), flush=True)
        for cname, kw in configs.items():
            cfg = GemmConfig(**kw) if kw else GemmConfig()
            if a.smoke:
                cfg = GemmConfig(block_m=16, block_n=64, block_k=16, num_warps=4, num_stages=2)
            try:
                t, e = measure(lambda x, w, b, cfg=cfg: linear_act(x, w, b, config=cfg, interpret=interpret))
                row = base | {"impl": cname, "us": t * 1e6, "tflops": flop / t / 1e12, "vs_xla": t / t_xla,
                              "max_err": e}
            except Exception as ex:  # noqa: BLE001 — a config Triton rejects must not end the run
                row = base | {"impl": cname, "error": f"{type(ex).__name__}: {ex}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.smoke:
                break
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    print("\n| shape | impl | µs | TFLOP/s | × XLA | max err |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['impl']} | {r['error'][:60]} | | | |")
        else:
            print(f"| {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['tflops']:.0f} | {r.get('vs_xla', 1.0):.2f} | "
                  f"{r['max_err']:.3g} |")


if __name__ == "__main__":
    main()
