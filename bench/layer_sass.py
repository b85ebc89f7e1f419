"""Static look at the persistent layer kernel (ftjax/pallas/decode_layer.py) on a machine without a GPU.

    pip install triton      # only for this tool (its compiler and ptxas; not a dependency of ftjax)
    python bench/layer_sass.py --models 350m,1.3b,6.7b,llama3-8b --weights bf16,int8t [--layer 'num_warps=4']

The layer is lowered as the decode step lowers it (`jax.export` for CUDA: Pallas' Triton lowering runs in
Python), compiled by the pip `triton` package for sm_90 and disassembled. Printed per kernel: registers,
shared memory, local memory (spills), how many programs one SM can hold by those resources (the kernel
needs every program of its grid resident at once: programs_per_sm programs a SM must fit), and each
projection loop's instructions per KB of weight streamed.

Caveat: XLA compiles with the Triton bundled in jaxlib, not the pip release; the figures show the shape of
the code, they do not time it (bench/step_ab.py does, on the GPU).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.e2e import MODELS  # noqa: E402
from bench.triton_sass import capture_ttir, compile_sm90, mma_loops, sass_lines  # noqa: E402

REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024


def layer_args(cfg, weights: str, M: int, s: int):
    """ShapeDtypeStructs of one layer of `cfg` (a bench/e2e.py model dict) as the kernel takes them."""
    from ftjax.pallas import decode_layer as L

    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    D, n, F = cfg["hidden"], cfg["num_heads"], cfg["ffn_dim"]
    kvh = cfg.get("num_kv_heads", n)
    h = D // n
    gated = cfg.get("gated_ffn", False)
    norm = cfg.get("norm", "layernorm")
    bias = cfg.get("attn_bias", True)
    int8 = weights.startswith("int8")
    t = weights == "int8t"
    dims = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
    vals = {}
    for name, (K, N) in zip(L.WEIGHTS, dims):
        vals[f"w{name}"] = sd((N, K) if t else (K, N), jnp.int8 if int8 else bf)
        vals[f"s{name}"] = sd((N,), bf) if int8 else None
        vals[f"b{name}"] = sd((N,), bf) if bias else None
    for i in (1, 2):
        vals[f"ln{i}_g"] = sd((D,), bf)
        vals[f"ln{i}_b"] = sd((D,), bf) if norm == "layernorm" else None
    vals["rope"] = sd((h // 2,), jnp.float32) if cfg.get("position") == "rotary" else None
    p = L.LayerParams(**vals)
    x, kc = sd((M, D), bf), sd((M, kvh, s, h), bf)
    return x, kc, p, (t,) * len(dims), norm, cfg.get("activation", "gelu_tanh")


def compile_stats(ttir: str, num_warps: int, num_stages: int, plan, itemsize: int) -> dict:
    k, res, sass = compile_sm90(ttir, num_warps, num_stages)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    shared = int(k.metadata.shared)
    threads = 32 * num_warps
    by_regs = REGS_PER_SM // (max(regs, 1) * threads)
    by_smem = SMEM_PER_SM // max(shared + 1024, 1)
    loops = []
    for start, end, body in mma_loops(sass_lines(sass)):
        # the hot path: up to the first forward branch that skips the column-block epilogue, then from its
        # target to the loop's end (the epilogue runs once per column block, not per tile)
        hot = len(body)
        for b, o, r in body:
            t = re.search(r"0x([0-9a-f]+)", r) if o == "BRA" else None
            if t and b < int(t.group(1), 16) <= end and int(t.group(1), 16) - b > 0x400:
                tgt = int(t.group(1), 16)
                hot = sum(1 for x, _, _ in body if x <= b or x >= tgt)
                break
        loops.append((hot, [o for _, o, _ in body]))
    # one loop per projection weight, in program order (the attention loop has no tensor-core op for MHA)
    tiles = [w.bn * w.bk * itemsize for w in plan_weights(plan)]
    proj_loops = [lp for lp in loops if sum(o.startswith(("HMMA", "IMMA", "HGMMA")) for o in lp[1]) >= 2]
    per_kb = [round(hot / (tile / 1024), 1) for (hot, _), tile in zip(proj_loops, tiles)]
    c = collections.Counter(o.split(".")[0] for o in (max((b for _, b in loops), key=len) if loops else []))
    return dict(regs=regs, local=local, shared=shared, programs_per_sm_fit=min(by_regs, by_smem),
                loops=len(loops), hot_instr_per_KB=per_kb, biggest_loop_top=", ".join(f"{v} {n}" for n, v in c.most_common(6)))


def plan_weights(plan):
    return list(plan.qkv) + [plan.o] + list(plan.fc1) + [plan.fc2]


def main():
    from bench.step_ab import layer_kwargs
    from ftjax.pallas import decode_layer as L

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1.3b")
    ap.add_argument("--weights", default="bf16,int8t")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--cache", type=int, default=640)
    ap.add_argument("--programs", type=int, default=132)
    ap.add_argument("--layer", nargs="*", default=[""], help="LayerConfig variants, each 'field=value,field=value'")
    a = ap.parse_args()
    for model in a.models.split(","):
        for wq in a.weights.split(","):
            for v in a.layer:
                kw = layer_kwargs(v)
                cfg = L.LayerConfig(programs=a.programs, **kw)
                x, kc, p, trans, norm, act = layer_args(MODELS[model], wq, a.rows, a.cache)
                plan = L.layer_plan(x, kc, p, trans, cfg, interpret=False)
                counters = jax.ShapeDtypeStruct((plan.n_counters,), jnp.int32)
                ttir = capture_ttir(lambda x, st, pos, kc, vc, cn, p: L.decode_layer(
                    x, st, pos, kc, vc, cn, p, trans=trans, norm=norm, act=act, config=cfg),
                    x, jax.ShapeDtypeStruct((2, a.rows, 1), jnp.float32), jax.ShapeDtypeStruct((a.rows,), jnp.int32),
                    kc, kc, counters, p)
                st = compile_stats(ttir, cfg.num_warps, cfg.num_stages, plan, 1 if wq.startswith("int8") else 2)
                print(f"{model} {wq} rows={a.rows} {v or 'default'}: {st}", flush=True)


if __name__ == "__main__":
    main()
