"""The host's share of a request before the prefill is launched (no device work): LLM.generate's prompt
conversion (_as_prompts) and per-prompt checks (Engine.check_prompt), then the sampling-parameter
expansion, the slot packing (sampling.pack) and the one int32 word vector (pack_words). Against the
per-id Python loops they replaced in the twentieth session (kept here as the reference), side by side.

    python bench/host_prep.py [--batch 64] [--prompt 512] [--reps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftjax import sampling  # noqa: E402
from ftjax.engine import Engine, pack_words  # noqa: E402
from ftjax.llm import _as_prompts  # noqa: E402


def old_as_prompts(prompts):   # before the twentieth session: int() per id
    out = []
    for p in prompts:
        out.append([int(t) for t in p])
    return out


def old_check(ids, cfg):   # cfg.vocab was read per id (ModelConfig.vocab is a property)
    bad = [t for t in ids if not 0 <= int(t) < cfg.vocab]
    if bad:
        raise ValueError(bad[0])


class _Cfg:
    eos_id = 50256

    @property
    def vocab(self):
        return 50304


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    prompts = np.random.RandomState(0).randint(1, 50304, (a.batch, a.prompt)).tolist()
    eng = object.__new__(Engine)
    eng.cfg, eng.S = _Cfg(), a.prompt + 64

    class _Fam:
        samples_at_prefill = True
    eng.family = _Fam()

    def new():
        ps = _as_prompts(prompts)
        for i, p in enumerate(ps):
            eng.check_prompt(p, 32, field=f"prompts[{i}]")

    def old():
        ps = old_as_prompts(prompts)
        for p in ps:
            old_check(p, eng.cfg)

    def pack():
        plist = [p.verify(eng.cfg.vocab, 1) for p in sampling.params_for_batch(a.batch, None, end_id=None)]
        sp = sampling.pack(plist, a.batch, vocab=eng.cfg.vocab, eos_id=eng.cfg.eos_id, word_capacity=(1, 1),
                           reset_capacity=1)
        tokens = np.zeros((a.batch, a.prompt), np.int32)
        return pack_words((tokens, sp))

    res = {}
    for name, f in (("old per-id loops", old), ("new (numpy rows)", new), ("params + pack + words", pack)):
        f()
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            f()
            ts.append(1e3 * (time.perf_counter() - t))
        res[name] = statistics.median(ts)
        print(f"{name:24s} {res[name]:8.3f} ms (min {min(ts):.3f})  batch {a.batch} x {a.prompt} tokens")
    print(json.dumps({"batch": a.batch, "prompt": a.prompt, "ms": res,
                      "old_over_new": res["old per-id loops"] / res["new (numpy rows)"]}))


if __name__ == "__main__":
    main()
