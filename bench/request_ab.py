"""A/B of whole requests (`LLM.generate` latency, host costs included) across engine variants, in one
process, side by side: the step-count mode and XLA options per executable (e.g. command buffers off for
the admit call, WHILE loops inside command buffers for the generate call).

    PYTHONUNBUFFERED=1 python bench/request_ab.py --model 350m --cases 1-128-8,1-512-32 \
        --variants pieces,exact,dyn_while [--reps 9] [--json FILE]

Each variant builds its own Engine on the same device weights; each case is compiled (two warm-up
requests) before its timed requests; rows print as they come. A variant is a preset name (PRESETS) or
`name=mode;exe:option=value;...` (exe: admit or generate for XLA options, engine for an Engine
attribute, set for a module global, `set:ftjax.models.gpt.NORM_KERNEL=false`, held while that variant's
engine compiles and runs, the jit caches cleared at each switch; mode: pieces, exact or dynamic; a list
value joins its items with '+').

--isolate runs each variant in a process of its own (the parent compares their tokens): variants compiled in one
process can interfere. The int8 dequantised-prefill switch (linear.INT8_DEQUANT_ROWS) measured ~10 ms apart in
separate processes, but in one process the variant compiled second took the first one's time, whichever it was
(bench/RESULTS.md, twentieth session). Use it for switches that change the GEMMs XLA compiles.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CB_DEFAULT = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"   # XLA's default set
CB_WHILE = CB_DEFAULT + ",WHILE,CONDITIONAL"
PRESETS = {
    "pieces": "pieces",
    "exact": "exact",
    "dynamic": "dynamic",
    "exact_admitnocb": "exact;admit:xla_gpu_enable_command_buffer=",
    "exact_while": f"exact;generate:xla_gpu_enable_command_buffer={CB_WHILE}",
    "dyn_while": f"dynamic;generate:xla_gpu_enable_command_buffer={CB_WHILE}",
    "dyn_while_admitnocb": f"dynamic;generate:xla_gpu_enable_command_buffer={CB_WHILE};"
                           "admit:xla_gpu_enable_command_buffer=",
    # loops of known trip count unrolled into the generate call's command buffer: one CUDA graph (one
    # launch) for the steps of a call under CHUNK, instead of one launch of the loop body per step
    "exact_unroll": f"exact;generate:xla_gpu_enable_command_buffer={CB_WHILE};"
                    "generate:xla_gpu_command_buffer_unroll_loops=true",
    # programmatic dependent launch (Hopper): a kernel may start while its predecessor drains
    "exact_pdl": "exact;generate:xla_gpu_enable_pdl=true;admit:xla_gpu_enable_pdl=true",
    "exact_nopdl": "exact;generate:xla_gpu_enable_pdl=false;admit:xla_gpu_enable_pdl=false",
    # the decode step without the fused path (small-M projections reduced by XLA, K/V scattered by XLA)
    "exact_unfused": "exact;engine:fuse_decode=false",
}
# exact_unroll with every call of up to 32 steps one loop of known trip count (no while loop): one graph
PRESETS["exact_unroll32"] = PRESETS["exact_unroll"] + ";engine:CHUNK=32"


def parse_variant(v: str):
    from bench.step_ab import _value

    name, _, body = v.partition("=") if "=" in v.split(";")[0] else (v, "", PRESETS[v])
    if not body:
        body = PRESETS[name]
    parts = body.split(";")
    mode, opts, attrs, sets = parts[0], {}, {}, []
    for p in parts[1:]:
        exe, _, kv = p.partition(":")
        k, _, val = kv.partition("=")
        if exe not in ("admit", "generate", "engine", "set") or not k:
            raise SystemExit(f"variant {v!r}: expected exe:option=value with exe admit, generate, engine "
                             f"(an Engine attribute) or set (a module global), got {p!r}")
        val = val.replace("+", ",")   # list values: '+' between items (',' separates the variants)
        val = int(val) if val.isdigit() else {"true": True, "false": False}.get(val, val)
        if exe == "engine":
            attrs[k] = val
        elif exe == "set":   # step_ab's values too: a float, None, a kernel config (SmallLinearConfig(...))
            val = None if val == "none" else _value(val) if isinstance(val, str) else val
            sets.append(k.rpartition(".")[::2] + (val,))
        else:
            opts.setdefault(exe, {})[k] = val
    if mode not in ("pieces", "exact", "dynamic"):
        raise SystemExit(f"variant {v!r}: unknown mode {mode!r}")
    return name, mode, opts, attrs, sets


def main():
    from bench.e2e import MODELS, SMOKE_MODELS

    models = {**MODELS, **SMOKE_MODELS}
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="350m", choices=sorted(models))
    ap.add_argument("--cases", default="1-128-8,1-512-32", help="batch-input-output, comma separated")
    ap.add_argument("--variants", default="pieces,exact,dyn_while")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int8e"],
                    help="int8 / int8e: weight-only INT8 (quantize='int8' / 'int8-embed') of the random weights")
    ap.add_argument("--json", default=None)
    ap.add_argument("--isolate", action="store_true", help="each variant in a process of its own")
    ap.add_argument("--compile-cache", default=None, help="jax's persistent compilation cache in this directory "
                    "(ftjax.compile_cache.enable; with --isolate every child uses it: the first compiles, the rest load)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one --isolate variant: ROW lines
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)         # its name (step_ab.run_child passes it)
    a = ap.parse_args()
    if a.isolate and not a.child:
        return isolated(a)

    import jax
    import numpy as np

    if a.compile_cache:
        from ftjax import compile_cache
        compile_cache.enable(a.compile_cache)
    from bench.e2e import random_params
    from ftjax.config import ModelConfig
    from ftjax.engine import Engine
    from ftjax.llm import LLM

    cfg = ModelConfig(**models[a.model])
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), random_params(cfg))
    if a.weights != "bf16":
        from ftjax import quantize as Q
        params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16,
                                   mode="int8-embed" if a.weights == "int8e" else "int8")
    cases = [tuple(int(x) for x in c.split("-")) for c in a.cases.split(",")]
    variants = [parse_variant(v) for v in a.variants.split(",")]
    if not a.child:
        _header(a, jax.devices()[0].device_kind, jax.__version__)
    out = open(a.json, "a") if a.json and not a.child else None
    ref = {}   # case -> the first variant's tokens (greedy: every variant must give the same)
    from bench.step_ab import apply_sets
    for name, mode, opts, attrs, sets in variants:
        restore = apply_sets(sets)
        for b, t_in, t_out in cases:
            Engine.compiler_options = opts
            try:
                llm = LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out,
                          max_beam_width=1, attention=a.attention)
            finally:
                Engine.compiler_options = {}
            llm.engine.steps_mode = mode
            for k, val in attrs.items():
                setattr(llm.engine, k, type(getattr(llm.engine, k))(val))
            rng = np.random.RandomState(0)
            prompts = rng.randint(1, cfg.vocab, size=(b, t_in)).tolist()
            t0 = time.perf_counter()
            try:
                llm.generate(prompts, max_new_tokens=t_out, end_id=None)
            except Exception as e:  # noqa: BLE001 -- an XLA option the runtime refuses: report, go on
                print(f"  b{b}-{t_in}-{t_out}  {name:22s} FAILED: {type(e).__name__}: {str(e)[:300]}")
                llm = None
                gc.collect()
                continue
            first = time.perf_counter() - t0
            llm.generate(prompts, max_new_tokens=t_out, end_id=None)
            lat = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                res = llm.generate(prompts, max_new_tokens=t_out, end_id=None)
                lat.append(time.perf_counter() - t0)
            assert all(len(t) == t_out for t in res.tokens)
            same = ref.setdefault((b, t_in, t_out), res.tokens) == res.tokens
            row = {"model": a.model, "weights": a.weights, "case": f"b{b}-{t_in}-{t_out}", "variant": name, "mode": mode,
                   "options": {**opts, **({"engine": attrs} if attrs else {}), **({"set": sets} if sets else {})}, "ms": 1e3 * statistics.median(lat), "min_ms": 1e3 * min(lat),
                   "first_s": first, "same_tokens": same, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "tokens_sha": hashlib.sha1(json.dumps(res.tokens).encode()).hexdigest()[:16]}
            if a.child:
                print("ROW " + json.dumps(row, default=str), flush=True)
                llm = res = None
                gc.collect()
                continue
            _report(row, out)
            del llm, res
            gc.collect()
        apply_sets(restore)


def _header(a, device, jax_version, extra=""):
    print(f"{a.model} ({a.weights}) on {device}, jax {jax_version}; ms per request, median of {a.reps} (min in "
          f"brackets){extra}", flush=True)


def _report(row, out):
    """One row: its line on stdout and, with --json, its JSON line."""
    print(f"  {row['case']:14s} {row['variant']:22s} {row['ms']:8.2f} ({row['min_ms']:.2f})  first {row['first_s']:.1f} s"
          f"{'' if row['same_tokens'] else '  TOKENS DIFFER from the first variant'}", flush=True)
    if out:
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()


def isolated(a):
    """--isolate: one child process per variant (this script with --child and that one variant, through
    step_ab.run_child); prints and writes their rows as they come, tokens compared with the first variant's by
    hash."""
    from bench.step_ab import run_child

    header, ref = [], {}
    out = open(a.json, "a") if a.json else None

    def on_row(row):
        if not header:
            _header(a, row["device"], row["jax"], "; a process per variant")
            header.append(True)
        row["same_tokens"] = ref.setdefault(row["case"], row["tokens_sha"]) == row["tokens_sha"]
        row["isolated"] = True
        _report(row, out)

    for v in a.variants.split(","):
        run_child(os.path.abspath(__file__), v.split("=")[0], "", [
            "--model", a.model, "--cases", a.cases, "--variants", v, "--reps", str(a.reps),
            "--attention", a.attention, "--weights", a.weights,
            *(["--compile-cache", a.compile_cache] if a.compile_cache else [])], on_row=on_row)


if __name__ == "__main__":
    main()
