"""Offline batch decoding of more prompts than slots (GPU): continuous batching (`LLM.generate` on the whole list:
a finished prompt's slots take the next one at once) against static batches (`LLM.generate` on one slot-sized
chunk after another: each chunk runs as long as its longest row), side by side in one process, same prompts.

  PYTHONUNBUFFERED=1 python bench/offline_decode.py [--model 350m] [--prompts 256] [--slots 64]
      [--in 32,512] [--out 16,256] [--reps 2] [--json FILE]
  python bench/offline_decode.py --smoke      # CPU: a tiny model, every path once

Prompt lengths and max_new_tokens are drawn uniformly from --in and --out (seeded); random bf16 weights, greedy,
no end id, so every prompt generates exactly its max_new_tokens and both ways produce the same tokens (checked).
Per variant: wall seconds of the whole list (median of --reps after a first run that compiles), generated tokens
per second, and the ratio. The work both do is the same tokens; what differs is the slot-steps spent on rows
that have finished while their chunk goes on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="350m")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--in", dest="inp", type=_range, default=(32, 512))
    ap.add_argument("--out", type=_range, default=(16, 256))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.prompts, a.slots, a.inp, a.out, a.reps = "tiny-gpt", 12, 4, (2, 20), (1, 12), 1

    import jax

    import ftjax
    from bench.common import emit_row
    from bench.e2e import MODELS, SMOKE_MODELS, make_config, random_params

    cfg = make_config(a.model, {**MODELS, **SMOKE_MODELS})
    params = random_params(cfg)
    S = a.inp[1] + a.out[1]
    llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=a.slots, max_seq_len=S, max_beam_width=1)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, cfg.vocab, size=rng.randint(a.inp[0], a.inp[1] + 1)).tolist() for _ in range(a.prompts)]
    max_new = [int(x) for x in rng.randint(a.out[0], a.out[1] + 1, size=a.prompts)]

    def continuous():
        return llm.generate(prompts, max_new_tokens=max_new, end_id=None).tokens

    def static():
        out = []
        for i in range(0, a.prompts, a.slots):
            out += llm.generate(prompts[i:i + a.slots], max_new_tokens=max_new[i:i + a.slots], end_id=None).tokens
        return out

    row = {"bench": "offline_decode", "model": a.model, "prompts": a.prompts, "slots": a.slots, "in": list(a.inp),
           "out": list(a.out), "tokens": sum(max_new), "device": jax.devices()[0].device_kind,
           "jax": jax.__version__}
    toks = {}
    for name, fn in (("continuous", continuous), ("static", static)):
        t0 = time.perf_counter()
        toks[name] = fn()   # compiles
        row[f"{name}_first_s"] = round(time.perf_counter() - t0, 3)
    for name, fn in (("continuous", continuous), ("static", static)):
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        row[f"{name}_s"] = round(statistics.median(times), 4)
        row[f"{name}_tok_s"] = round(sum(max_new) / statistics.median(times), 1)
    row["static_over_continuous"] = round(row["static_s"] / row["continuous_s"], 3)
    row["same_tokens"] = toks["continuous"] == toks["static"]
    # slot-steps each way: the static chunks run their longest row's steps for every slot
    row["static_slot_steps"] = sum(max(max_new[i:i + a.slots]) * a.slots for i in range(0, a.prompts, a.slots))
    row["useful_slot_steps"] = sum(max_new)
    emit_row(row, a.json)
    if not row["same_tokens"]:
        print("ERROR: continuous and static batches gave different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
