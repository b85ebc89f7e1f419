"""Does XLA fold bias + tanh-GELU into the cuBLAS(Lt) GEMM for bf16? (GPU) fc1 of GPT-350M at prefill size
(M rows x 1024 @ 1024 x 4096, bf16) in four forms, with and without xla_gpu_enable_cublaslt: the custom
calls and cuBLASLt epilogues in the compiled HLO, the time of a call, and the error against float32.

    python bench/gelu_epilogue_probe.py [M]          # default 32768 (batch 64 x 512 tokens)
"""
import re
import sys
import time

import jax
import jax.numpy as jnp

M = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
K, N = 1024, 4096
kx, kw = jax.random.split(jax.random.key(0))
x = (jax.random.normal(kx, (M, K), jnp.float32)).astype(jnp.bfloat16)
w = (0.02 * jax.random.normal(kw, (K, N), jnp.float32)).astype(jnp.bfloat16)
b = jnp.zeros((N,), jnp.bfloat16) + 0.01
def f32act(x, w, b):
    y = jnp.dot(x, w, preferred_element_type=jnp.bfloat16) + b
    return jax.nn.gelu(y.astype(jnp.float32), approximate=True).astype(jnp.bfloat16)
def lowact(x, w, b):
    y = jnp.dot(x, w, preferred_element_type=jnp.bfloat16) + b
    return jax.nn.gelu(y, approximate=True)
def lowact2(x, w, b):   # the HLO test's form: x * (0.5 * (1 + tanh(c * (x + 0.044715 x^3))))
    y = jnp.dot(x, w, preferred_element_type=jnp.bfloat16) + b
    c = jnp.asarray(0.7978845608028654, y.dtype)
    return y * (jnp.asarray(0.5, y.dtype) * (jnp.asarray(1, y.dtype) + jnp.tanh(c * (y + jnp.asarray(0.044715, y.dtype) * (y * y * y)))))
def plain(x, w, b):
    return jnp.dot(x, w, preferred_element_type=jnp.bfloat16) + b
ref = f32act(x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32))
for name, fn in [("plain", plain), ("f32act", f32act), ("lowact", lowact), ("lowact2", lowact2)]:
    for opts in [{}, {"xla_gpu_enable_cublaslt": True}]:
        try:
            c = jax.jit(fn).lower(x, w, b).compile(compiler_options=opts) if opts else jax.jit(fn).lower(x, w, b).compile()
        except Exception as e:
            print(name, opts, "compile failed", type(e).__name__, str(e)[:200]); continue
        txt = c.as_text()
        ccs = sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt)))
        epi = sorted(set(re.findall(r'"epilogue":"([A-Z_]+)"', txt)))
        nfus = len(re.findall(r"^\s*\S+ = \S+ fusion\(", txt, re.M))
        out = c(x, w, b); out.block_until_ready()
        for _ in range(3): c(x, w, b).block_until_ready()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter(); c(x, w, b).block_until_ready(); ts.append(time.perf_counter() - t0)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) if name != "plain" else float("nan")
        print(f"{name:8s} lt={bool(opts)} {1e3*sorted(ts)[5]:.3f} ms  calls={ccs} epilogue={epi} fusions={nfus} maxerr={err:.4f}")
