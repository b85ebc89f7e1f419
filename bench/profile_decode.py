"""Profile ftjax's decode loop on the GPU: how much of a decode step is kernels, how many kernels a
step launches, and which ones cost most. Evidence for the per-step overhead in bench/RESULTS.md.

    PYTHONUNBUFFERED=1 python bench/profile_decode.py [--model 350m|1.3b] [--batch 1] [--steps 64]

Runs generate for --steps tokens under `jax.profiler.trace(..., create_perfetto_trace=True)`, then
reads the Perfetto JSON: GPU kernel events (by stream), their count per decode step, busy time vs the
wall time of the loop, and the top kernels by total time.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def main():
    ap = argparse.ArgumentParser()
    from bench.e2e import MODELS, SMOKE_MODELS
    MODELS = {**MODELS, **SMOKE_MODELS}

    ap.add_argument("--model", default="350m", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--quantize", default=None, choices=[None, "int8", "int8kn", "int8t", "int8e"],
                    help="weight-only int8 (as ftjax.load: the engine picks the layout); int8kn / int8t: "
                    "QuantizedWeight / QuantizedWeightT (Engine.int8_layout kn / nk)")
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    ap.add_argument("--sequence", default=None, help="write the kernel names of ~2 decode steps from the middle "
                    "of the loop, in launch order with durations (us), to this file")
    ap.add_argument("--save-trace", default=None, help="trace the host too (XLA runtime and Python) and copy the "
                    "Perfetto JSON (.json.gz) here; read it with bench/host_trace.py")
    ap.add_argument("--steps-mode", default=None, choices=[None, "pieces", "exact"])
    ap.add_argument("--fuse", default=None, choices=[None, "off", "stats", "stats2", "norm", "layer"],
                    help="the decode step's fused path (Engine.fuse_decode; off: the small-M projections "
                    "reduced by XLA); default: the engine's")
    ap.add_argument("--append-config", default=None, help="block_k,min_blocks_per_split of the fused path's "
                    "attention kernel (ftjax.pallas.decode_attention.APPEND_CONFIG)")
    ap.add_argument("--set", nargs="*", default=[], help="module globals read when the step is traced, each "
                    "'module.attr:value' (as bench/step_ab.py --sl's '@' items)")
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.common import trace_kernels
    from bench.e2e import random_params
    from ftjax.config import ModelConfig

    from bench.step_ab import INT8_LAYOUTS, apply_set_args
    apply_set_args(a.set)
    cfg = ModelConfig(**MODELS[a.model])
    params = random_params(cfg)
    if a.quantize:
        from ftjax import quantize as Q
        params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16,
                                   mode="int8-embed" if a.quantize == "int8e" else "int8")
    llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=max(a.batch, 1), max_seq_len=a.prompt + a.steps + 8,
                    attention=a.attention)
    llm.engine.int8_layout = INT8_LAYOUTS.get(a.quantize, "auto")
    if a.steps_mode:
        llm.engine.steps_mode = a.steps_mode
    if a.fuse:
        llm.engine.fuse_decode = False if a.fuse == "off" else a.fuse
    if a.append_config:
        from ftjax.pallas import decode_attention as DA
        bk, mb = (int(v) for v in a.append_config.split(","))
        DA.APPEND_CONFIG = DA.DecodeConfig(block_k=bk, min_blocks_per_split=mb)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, min(50000, cfg.vocab_size), size=a.prompt).tolist() for _ in range(a.batch)]
    llm.generate(prompts, max_new_tokens=a.steps, end_id=None)        # compile
    t0 = time.perf_counter()
    llm.generate(prompts, max_new_tokens=a.steps, end_id=None)
    untraced = time.perf_counter() - t0
    traced = []

    def run():
        t0 = time.perf_counter()
        llm.generate(prompts, max_new_tokens=a.steps, end_id=None)
        traced.append(time.perf_counter() - t0)

    ev = trace_kernels(run, tempfile.mkdtemp(prefix="trace_", dir=a.out), host=bool(a.save_trace), save=a.save_trace)
    traced = traced[0]
    if not ev:
        print("no GPU kernels in the trace")
        return
    kern = [{"name": n, "ts": ts, "dur": d} for n, ts, d in ev]
    t_first = min(e["ts"] for e in kern)
    t_last = max(e["ts"] + e.get("dur", 0) for e in kern)
    busy = sum(e.get("dur", 0) for e in kern)
    by = collections.defaultdict(lambda: [0, 0.0])
    for e in kern:
        by[e["name"]][0] += 1
        by[e["name"]][1] += e.get("dur", 0)
    steps = a.steps - 1
    print(f"{a.model} batch {a.batch}, {a.steps} tokens, attention={a.attention}: untraced {untraced * 1e3:.1f} ms, "
          f"traced {traced * 1e3:.1f} ms")
    print(f"GPU kernels: {len(kern)} events ({len(kern) / steps:.0f} per decode step, "
          f"{len(kern) / steps / cfg.num_layers:.1f} per layer-step); span {(t_last - t_first) / 1e3:.2f} ms, "
          f"busy {busy / 1e3:.2f} ms ({100 * busy / max(t_last - t_first, 1):.0f}% of the span); "
          f"per step: span {(t_last - t_first) / steps:.0f} us, busy {busy / steps:.0f} us")
    if a.sequence:
        order = sorted(kern, key=lambda e: e["ts"])
        per = max(1, len(order) // max(steps, 1))
        mid = len(order) // 2
        with open(a.sequence, "w") as f:
            prev = None
            for e in order[mid: mid + 2 * per]:
                gap = e["ts"] - prev if prev is not None else 0.0
                prev = e["ts"] + e.get("dur", 0)
                f.write(f"{e.get('dur', 0):8.1f} {gap:8.1f}  {e['name']}\n")
    # Before the decode loop: prefill + insert (everything launched before the first decode-attention
    # kernel, or before the first kernel of the decode loop's XLA attention when --attention xla).
    order = sorted(kern, key=lambda e: e["ts"])
    first_dec = next((i for i, e in enumerate(order) if "decode_attention" in e["name"]), None)
    if first_dec:
        pre = order[:first_dec]
        # the decode loop's first step starts after the last kernel of the prefill/insert calls: take the
        # largest gap before the first decode-attention kernel as the boundary
        gaps = [(order[i]["ts"] - (order[i - 1]["ts"] + order[i - 1].get("dur", 0)), i) for i in range(1, first_dec + 1)]
        g, cut = max(gaps)
        pre = order[:cut]
        p_span = pre[-1]["ts"] + pre[-1].get("dur", 0) - pre[0]["ts"]
        p_busy = sum(e.get("dur", 0) for e in pre)
        print(f"prefill+insert: {len(pre)} kernels, span {p_span:.0f} us, busy {p_busy:.0f} us; then an idle gap of "
              f"{g:.0f} us before the decode loop; traced wall {traced * 1e6:.0f} us vs GPU span "
              f"{t_last - t_first:.0f} us (the rest is host time outside any kernel)")
        if a.sequence:
            with open(a.sequence + ".prefill", "w") as f:
                prev = None
                for e in pre:
                    gap = e["ts"] - prev if prev is not None else 0.0
                    prev = e["ts"] + e.get("dur", 0)
                    f.write(f"{e.get('dur', 0):8.1f} {gap:8.1f}  {e['name']}\n")
    print("top kernels by total time (count, total us, mean us):")
    for name, (n, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {n:6d} {d:10.0f} {d / n:8.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
