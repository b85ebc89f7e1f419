"""Tensor / pipeline parallel scaling of decode (GPU): latency of one decode step and throughput, for
T = 1, 2, 4, 8 (those the machine has GPUs for; on one GPU only T=1) and optionally P.

  PYTHONUNBUFFERED=1 python bench/scaling.py [--model 1.3b] [--batch 1,8,32] [--tp 1,2,4,8] [--pp 1]
      [--prompt 128] [--steps 64] [--reps 3] [--dtype bfloat16] [--attention auto] [--out $OUT]
  python bench/scaling.py --smoke      # CPU, 8 virtual devices, a tiny model: every code path once

Random weights (bench/e2e.py's shapes), every token generated (greedy, end_id=None). Per (T, P, batch):
the batch is prefilled and inserted once, then `generate_steps(steps)` is timed (median of --reps after a
warm-up that compiles): step latency = time / steps, throughput = batch * steps / time. Speed-up is
against T=1 at the same batch. Results: a markdown table last; JSON rows in $OUT/scaling.json when --out
(or $OUT) is set. Attention defaults to "auto" (the Pallas kernels on a GPU, XLA elsewhere): at T > 1
ftjax/pallas/ops.py runs the kernels once per tensor shard (shard_map over the heads: each GPU attends
with its own heads and kv heads, nothing gathered), as XLA partitions its own attention over heads;
`--attention xla` measures the XLA path instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMOKE = dict(vocab_size=211, hidden=64, num_layers=4, num_heads=8, ffn_dim=128, max_positions=64)


def model_config(name: str):
    from ftjax.config import ModelConfig

    if name == "smoke":
        return ModelConfig(**SMOKE)
    from bench.e2e import MODELS

    return ModelConfig(**MODELS[name])


def random_params(cfg, seed=0):
    """Host numpy weights of the model's shapes (no device memory until the engine places them)."""
    import jax
    import numpy as np

    from ftjax.models import gpt

    shapes, _ = gpt.abstract_params(cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02), shapes)


def run_one(cfg, params, T, P, batch, a):
    import numpy as np

    import ftjax
    from ftjax.sharding.mesh import make_mesh

    mesh = make_mesh(T, P) if T * P > 1 else None
    S = a.prompt + a.steps + 2
    llm = ftjax.LLM(cfg, params, dtype=a.dtype, max_batch_size=batch, max_seq_len=S, attention=a.attention,
                    max_beam_width=1, mesh=mesh)
    eng = llm.engine
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size - 1, a.prompt).tolist() for _ in range(batch)]
    sp = llm.sampling_params(batch, end_id=None)
    times = []
    for r in range(a.reps + 1):
        st = eng.init_state()
        st = eng.prefill_insert(st, prompts, list(range(batch)), [a.steps + 1] * batch, sp)
        st.seq.block_until_ready()
        t0 = time.perf_counter()
        st, n = eng.generate_steps(st, a.steps)
        st.seq.block_until_ready()
        if r:                       # the first run compiles
            times.append(time.perf_counter() - t0)
        assert int(n) == a.steps, (int(n), a.steps)
    t = statistics.median(times)
    return {"T": T, "P": P, "batch": batch, "step_ms": 1e3 * t / a.steps, "tokens_per_s": batch * a.steps / t}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--pp", default="1")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        a.model, a.batch, a.tp, a.pp, a.prompt, a.steps, a.reps = "smoke", "4", "1,2,4,8", "1,2", 8, 8, 1
        a.dtype, a.attention = "float32", "xla"
    import jax

    cfg = model_config(a.model)
    params = random_params(cfg)
    n = jax.device_count()
    rows = []
    for P in [int(x) for x in a.pp.split(",")]:
        for T in [int(x) for x in a.tp.split(",")]:
            if T * P > n:
                print(f"skip T={T} P={P}: {n} device(s)", file=sys.stderr)
                continue
            for b in [int(x) for x in a.batch.split(",")]:
                try:
                    row = run_one(cfg, params, T, P, b, a)
                except ValueError as e:      # a layout the model does not divide
                    print(f"skip T={T} P={P} batch={b}: {e}", file=sys.stderr)
                    continue
                base = next((r for r in rows if r["T"] == 1 and r["P"] == 1 and r["batch"] == b), None)
                row["speedup"] = base["step_ms"] / row["step_ms"] if base else 1.0
                row.update(model=a.model, dtype=a.dtype, attention=a.attention, device=jax.devices()[0].device_kind,
                           jax=jax.__version__, prompt=a.prompt, steps=a.steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | T | P | batch | step ms | tokens/s | speed-up vs T=1 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['T']} | {r['P']} | {r['batch']} | {r['step_ms']:.3f} | {r['tokens_per_s']:.0f} "
              f"| {r['speedup']:.2f} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "scaling.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
