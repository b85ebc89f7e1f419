"""Static look at the small-M projection kernel's machine code, on a machine without a GPU.

    pip install triton      # only for this tool (its compiler and ptxas; not a dependency of ftjax)
    python bench/triton_sass.py --model 1.3b --ops qkv,fc1 --weights bf16,int8,int8t [--sl name=field:value;...]

Each (op, weights, config) is lowered exactly as the decode step lowers it (`small_linear_parts` through
`jax.export` for CUDA: Pallas' Triton lowering runs in Python), the Triton module is captured, compiled by
the pip `triton` package for sm_90 (its own passes: software pipelining, layouts, ptxas), and the cubin
is disassembled. Printed per kernel: registers, shared memory, and for the K loop its instruction count,
instructions per KB of weight streamed, and the most frequent instructions (e.g. `LDS.U8`, byte-wise
shared-memory loads, against `LDSM` / `LDS.64`).

Caveat: XLA compiles these kernels with the Triton bundled in jaxlib, not the pip release, so the code
can differ in detail; this shows the shape of the machine code (what a tile costs to issue), it does not
measure time. Timing is bench/step_ab.py / bench/profile_decode.py on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax import export

from bench.small_linear import MODELS

OPS_1 = {"qkv": 0, "o": 1, "fc1": 2, "fc2": 3}


def capture_ttir(fn, *args) -> str:
    """The Triton module (MLIR text) of the single Pallas kernel in fn(*args), lowered for CUDA."""
    try:
        import jax._src.pallas.triton.pallas_call_registration as R
    except ImportError as e:  # pragma: no cover - jax internals moved
        raise SystemExit(f"this jax ({jax.__version__}) moved Pallas' Triton lowering: {e}")
    got = []
    orig = R.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **k):
        r = orig(*a, **k)
        got.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    R.lowering.lower_jaxpr_to_triton_module = hook
    try:
        export.export(jax.jit(fn), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        R.lowering.lower_jaxpr_to_triton_module = orig
    assert len(got) == 1, f"expected one Pallas kernel, lowered {len(got)}"
    return got[0]


def _ttir_stage(path: str, out: str) -> str:
    """The TTIR file at path after the pip Triton's own TTIR stage (make_ttir), written to out."""
    from triton._C.libtriton import ir
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.backends.compiler import GPUTarget

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx
    mod = backend.make_ttir(mod, {}, backend.parse_options({}), 90)
    with open(out, "w") as f:
        f.write(str(mod))
    return out


def compile_sm90(ttir: str, num_warps: int, num_stages: int):
    """Compile a captured Triton module with the pip `triton` for sm_90: (compiled kernel, the cuobjdump
    resource usage text, the SASS text)."""
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # jaxlib's Triton prints a load's eviction policy as a bare keyword; the pip release parses an attribute
    ttir = re.sub(r"evictionPolicy = (evict_\w+)",
                  r"{cachePolicy = #tt.cache_policy<cache_modifier = none, eviction_policy = \1>}", ttir)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ttir")
        with open(src, "w") as f:
            f.write(ttir)
        # triton.compile skips the passes of an IR file's own stage; XLA runs them (its Triton pipeline
        # mirrors make_ttir: canonicalize, combine -- which folds Pallas' `acc + dot(a, b, 0)` into the dot's
        # accumulator -- CSE, ...), so run them here first, then compile the result.
        src = _ttir_stage(src, os.path.join(d, "k2.ttir"))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", cub],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cub],
                              capture_output=True, text=True, check=True).stdout
    return k, res, sass


def sass_lines(sass: str):
    """[(address, opcode, operands)] of a cuobjdump -sass listing (predicates dropped)."""
    return [(int(a, 16), op, rest) for a, op, rest in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)]


def mma_loops(lines):
    """[(start, end, body lines)] of the loops (a backward branch) that hold a tensor-core instruction."""
    loops = []
    for a, op, rest in lines:
        m = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if m and int(m.group(1), 16) < a:
            start = int(m.group(1), 16)
            body = [ln for ln in lines if start <= ln[0] <= a]
            if any(o.startswith(("HMMA", "IMMA", "HGMMA")) for _, o, _ in body):
                loops.append((start, a, body))
    return loops


def sass_stats(ttir: str, num_warps: int, num_stages: int, weight_bytes_per_iter: int | None):
    k, res, sass = compile_sm90(ttir, num_warps, num_stages)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    lines = sass_lines(sass)
    loops = [[o for _, o, _ in body] for _, _, body in mma_loops(lines)]
    out = dict(regs=regs, shared=k.metadata.shared, instructions=len(lines))
    if loops:
        body = max(loops, key=len)
        c = collections.Counter(o if o.startswith(("LDS", "LDG", "STS")) else o.split(".")[0] for o in body)
        out.update(loop=len(body), top=", ".join(f"{v} {n}" for n, v in c.most_common(10)))
        if weight_bytes_per_iter:
            out["per_KB"] = round(len(body) / (weight_bytes_per_iter / 1024), 1)
    return out


def main():
    from bench.step_ab import parse_sl
    from ftjax.pallas.small_linear import choose_config, small_linear_parts

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b", help="gpt350m / gpt1.3b / llama3-8b (bench/small_linear.py shapes)")
    ap.add_argument("--ops", default="qkv,fc1")
    ap.add_argument("--weights", default="bf16,int8,int8t")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--sl", nargs="*", default=["default="])
    a = ap.parse_args()
    model = a.model if a.model in MODELS else "gpt" + a.model
    table = {op: (K, Ns) for op, K, Ns in MODELS[model]}
    for op in a.ops.split(","):
        K, Ns = table[op]
        for wq in a.weights.split(","):
            dt = jnp.bfloat16 if wq == "bf16" else jnp.int8
            t = wq == "int8t"
            for name, cfg, _ in (parse_sl(v) for v in a.sl):
                res = choose_config(a.m, K, Ns, dt, cfg, kmajor=t)
                ws = [jax.ShapeDtypeStruct((n, K) if t else (K, n), dt) for n in Ns]
                ttir = capture_ttir(lambda x, *w: small_linear_parts(x, list(w), config=cfg, transposed=[t] * len(w)),
                                    jax.ShapeDtypeStruct((a.m, K), jnp.bfloat16), *ws)
                tile = res.block_n * res.block_k * jnp.dtype(dt).itemsize
                st = sass_stats(ttir, res.num_warps, res.num_stages, tile)
                print(f"{model} {op} {wq} {name}: tile {res.block_k}x{res.block_n} ({tile // 1024} KB), splits "
                      f"{res.num_splits}, warps {res.num_warps}, stages {res.num_stages} -> {st}", flush=True)


if __name__ == "__main__":
    main()
