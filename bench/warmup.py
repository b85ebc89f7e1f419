"""What the server's warm-up buys: time to ready, and the first requests' latency after it.

    PYTHONUNBUFFERED=1 python bench/warmup.py --model 1.3b --warmup none
    PYTHONUNBUFFERED=1 python bench/warmup.py --model 1.3b --warmup greedy,sampled

One process per setting (the jit caches, and jax's persistent compilation cache, which is left off here, would
otherwise carry compiles over). A Scheduler as `python -m ftjax.serve` builds it (chunk 8, stream chunk 4), on
random bf16 weights; then, one at a time, a greedy request, a streamed sampled one and a second greedy one
(prompt --prompt ids, --out ids each): their latency from submit to the last answer. Without a warm-up the
first of each kind includes its compiles; the second greedy one is the steady state.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--warmup", default="greedy,sampled", help="'none' or kinds, as python -m ftjax.serve --warmup")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--out-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.common import device_info, emit_row
    from bench.e2e import MODELS, SMOKE_MODELS, random_params
    from ftjax.config import ModelConfig
    from ftjax.sampling import SamplingParams
    from ftjax.serve.scheduler import Request, Scheduler
    from ftjax.serve.tensors import Row

    cfg = ModelConfig(**{**MODELS, **SMOKE_MODELS}[a.model])
    llm = ftjax.LLM(cfg, random_params(cfg), dtype="bfloat16", max_batch_size=a.max_batch_size,
                    max_seq_len=min(1024, cfg.max_positions))
    sched = Scheduler(llm, chunk=8, stream_chunk=4)
    sched.warmup = () if a.warmup == "none" else tuple(a.warmup.split(","))
    t0 = time.perf_counter()
    sched.start()
    sched.ready.wait(900)
    ready_s = time.perf_counter() - t0
    assert sched.error is None, sched.error
    rng = np.random.RandomState(0)
    rows = {"device": device_info(), "jax": jax.__version__, "model": a.model, "warmup": a.warmup,
            "ready_s": round(ready_s, 2), "warmup_s": round(sched.warmup_s, 2)}
    try:
        for name, p, stream in [("first greedy", SamplingParams(end_id=None), False),
                                ("first sampled (streamed)", SamplingParams(top_k=8, random_seed=3, end_id=None), True),
                                ("second greedy", SamplingParams(end_id=None), False)]:
            prompt = rng.randint(2, cfg.vocab_size, size=a.prompt).tolist()
            t = time.perf_counter()
            r = sched.submit(Request([Row(prompt, a.out_tokens, p)], stream=stream))
            while True:
                u = r.get(timeout=900)
                assert u.kind != "error", u.message
                if u.kind == "done":
                    break
            rows[name + " ms"] = round(1e3 * (time.perf_counter() - t), 1)
    finally:
        sched.stop()
    emit_row(rows, a.json)


if __name__ == "__main__":
    main()
