"""Where a batch-1 request's time goes, phase by phase, without and with the profiler.

    PYTHONUNBUFFERED=1 python bench/request_phases.py --cases 350m-1-128-8,1.3b-1-512-32 \
        [--weights bf16,int8] [--save-trace DIR]

For each case (model-batch-prompt-output) and weight format, after a warm-up:
- `generate`: one `LLM.generate` call (ms, median of --reps);
- `admit dispatch`: host time until `Engine.prefill_insert` returns; `admit wall`: until its outputs are
  ready (so the admit's GPU work plus whatever the host did before the GPU could start);
- `steps dispatch` / `steps wall`: the same for the `generate_steps` call of output-1 steps;
- from one traced admit (no host tracing): its GPU kernels (count, busy ms, span ms, the costliest).
With --save-trace a second traced request also records the host (XLA runtime, Python) into
DIR/<case>-<weights>.json.gz for bench/host_trace.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="350m-1-128-8,1.3b-1-128-8,1.3b-1-512-32")
    ap.add_argument("--weights", default="bf16", help="comma list of bf16, int8")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--save-trace", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    ap.add_argument("--set", nargs="*", default=[], help="'module.attr:value' switches (as step_ab's '@' items)")
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.common import device_info, trace_kernels
    from bench.e2e import MODELS, SMOKE_MODELS, random_params
    from bench.step_ab import apply_set_args
    from ftjax.config import ModelConfig
    apply_set_args(a.set)
    models = {**MODELS, **SMOKE_MODELS}
    print(f"device: {device_info()}, jax {jax.__version__}")
    rows = []
    loaded, params = None, None     # the weights of the last (model, format): consecutive rows share them
    for case in a.cases.split(","):
        name, b, t_in, t_out = case.rsplit("-", 3)
        b, t_in, t_out = int(b), int(t_in), int(t_out)
        cfg = ModelConfig(**models[name])
        for wname in a.weights.split(","):
            if loaded != (name, wname):
                params = None   # the previous weights go before the next ones are made
                params = random_params(cfg)
                if wname == "int8":
                    from ftjax import quantize as Q
                    params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16)
                loaded = (name, wname)
            llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out,
                            max_beam_width=1)
            rng = np.random.RandomState(0)
            prompts = rng.randint(1, cfg.vocab, size=(b, t_in)).tolist()
            llm.generate(prompts, max_new_tokens=t_out, end_id=None)
            llm.generate(prompts, max_new_tokens=t_out, end_id=None)
            eng = llm.engine
            plist = llm.sampling_params(b, end_id=None)
            gen, ad, aw, sd, sw = [], [], [], [], []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                llm.generate(prompts, max_new_tokens=t_out, end_id=None)
                gen.append(time.perf_counter() - t0)
            st = llm._state
            for _ in range(a.reps):
                t0 = time.perf_counter()
                st = eng.prefill_insert(st, prompts, list(range(b)), [t_out] * b, plist)
                t1 = time.perf_counter()
                jax.block_until_ready(st.seq)
                t2 = time.perf_counter()
                st, _ = eng.generate_steps(st, t_out - 1)
                t3 = time.perf_counter()
                jax.block_until_ready(st.seq)
                t4 = time.perf_counter()
                ad.append(t1 - t0)
                aw.append(t2 - t0)
                sd.append(t3 - t2)
                sw.append(t4 - t2)
            llm._state = st

            def med(x):
                return round(1e3 * statistics.median(x), 3)

            row = {"case": case, "weights": wname, "generate_ms": med(gen), "admit_dispatch_ms": med(ad),
                   "admit_wall_ms": med(aw), "steps_dispatch_ms": med(sd), "steps_wall_ms": med(sw),
                   "step_ms": round(med(sw) / max(1, t_out - 1), 4)}
            # GPU side of one admit (profiler on, host not traced)
            holder = {}

            def run_admit():
                holder["st"] = eng.prefill_insert(llm._state, prompts, list(range(b)), [t_out] * b, plist)
                jax.block_until_ready(holder["st"].seq)

            ev = trace_kernels(run_admit, tempfile.mkdtemp(prefix="tr_", dir=a.out))
            llm._state = holder["st"]
            if ev:
                t_first = min(ts for _, ts, _ in ev)
                t_last = max(ts + d for _, ts, d in ev)
                row.update(admit_kernels=len(ev), admit_gpu_busy_ms=round(sum(d for *_, d in ev) / 1e3, 3),
                           admit_gpu_span_ms=round((t_last - t_first) / 1e3, 3))
                top = {}
                for n, _, d in ev:
                    k = n[:40]
                    top[k] = top.get(k, 0.0) + d
                row["admit_top"] = sorted(((round(v, 1), k) for k, v in top.items()), reverse=True)[:12]
            if a.save_trace:
                os.makedirs(a.save_trace, exist_ok=True)

                def run_req():
                    llm.generate(prompts, max_new_tokens=t_out, end_id=None)
                trace_kernels(run_req, tempfile.mkdtemp(prefix="trh_", dir=a.out), host=True,
                              save=os.path.join(a.save_trace, f"{case}-{wname}.json.gz"))
            print(json.dumps(row), flush=True)
            rows.append(row)
            llm = None   # frees the engine's cache before the next row's
    with open(os.path.join(a.out, "request_phases.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
