"""GPU check of the admit's prefill writing the prompts' K/V into the cache itself (`engine.PREFILL_WRITES_KV`,
off by default) against the separate insert, through the Triton-compiled kernels (CPU CI runs the same
comparison interpreted: tests/test_prefill_writes_kv.py):

  PYTHONUNBUFFERED=1 python tests/gpu/check_kvwrite.py
  python tests/gpu/check_kvwrite.py --smoke     # CPU: small widths, interpreted kernels

Two-layer bf16 GPT models of the benchmark widths (1024 hidden / 16 heads: head_dim 64; 2048 / 16: head_dim
128), random weights, a batch of prompts of mixed lengths admitted into slots 1.. of a state whose slot 0 already
holds a request: the cache rows (bitwise: both paths store the same projection outputs), the earlier row
untouched, and the greedy tokens and log probs of whole requests. Prints PASS / FAIL lines, exits 1 on a failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

import ftjax  # noqa: E402
from ftjax import engine as E  # noqa: E402
from ftjax.config import ModelConfig  # noqa: E402
from ftjax.models import gpt  # noqa: E402
from ftjax.pallas import prefill_attention as PA  # noqa: E402

from check_model import FAILS, report  # noqa: E402  (this directory: the GPU checks' shared PASS/FAIL log)


def run(hidden: int, heads: int, lengths, seed: int, smoke: bool = False):
    vocab = 300 if smoke else 50257
    cfg = ModelConfig(vocab_size=vocab, max_positions=1024, hidden=hidden, num_layers=2, num_heads=heads,
                      ffn_dim=4 * hidden, bos_id=0, eos_id=vocab - 1)
    params = gpt.init_params(cfg, seed=seed)
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(2, vocab - 1, size=n)) for n in lengths]
    decided = []
    real = PA.kernel_writes_kv
    PA.kernel_writes_kv = lambda *a: decided.append(real(*a)) or decided[-1]
    out = {}
    saved = E.PREFILL_WRITES_KV, E.INSERT_IN_PLACE_MIN_TOKENS
    E.INSERT_IN_PLACE_MIN_TOKENS = 0     # every admit below is contiguous (the path the switch changes)
    try:
        for on in (False, True):
            E.PREFILL_WRITES_KV = on
            llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=len(prompts) + 1,
                            max_seq_len=256 if smoke else 1024, **({"attention": "pallas"} if smoke else {}))
            assert llm.engine._prefill_writes_kv == on
            eng = llm.engine
            st = eng.init_state()
            st = eng.prefill_insert(st, [[7, 8, 9]], [0], [4], llm.sampling_params(1, end_id=None))
            st = eng.prefill_insert(st, prompts, list(range(1, len(prompts) + 1)), [8] * len(prompts),
                                    llm.sampling_params(len(prompts), end_id=None))
            cache = [{k: np.asarray(v.astype("float32")) for k, v in layer.items()} for layer in st.cache]
            res = llm.generate(prompts, max_new_tokens=4 if smoke else 16, end_id=None, return_log_probs=True)
            out[on] = cache, res.tokens, np.asarray(res.output_log_probs)
    finally:
        PA.kernel_writes_kv = real
        E.PREFILL_WRITES_KV, E.INSERT_IN_PLACE_MIN_TOKENS = saved
    name = f"hidden {hidden} heads {heads} lengths {lengths}"
    report(f"{name}: the kernel wrote the K/V", bool(decided) and all(decided), f"decisions {decided}")
    (c0, t0, lp0), (c1, t1, lp1) = out[False], out[True]
    same, untouched = True, True
    for l0, l1 in zip(c0, c1):
        for key in ("k", "v"):
            a, b = l0[key], l1[key]
            untouched &= bool(np.array_equal(a[0, :, :3], b[0, :, :3]))
            for slot, p in enumerate(prompts, start=1):
                same &= bool(np.array_equal(a[slot, :, :len(p)], b[slot, :, :len(p)]))
    report(f"{name}: cache rows bitwise equal", same)
    report(f"{name}: the earlier request's row untouched", untouched)
    report(f"{name}: greedy tokens equal", t0 == t1)
    report(f"{name}: log probs equal", bool(np.allclose(lp0, lp1, atol=1e-3)), f"max diff {np.max(np.abs(lp0 - lp1)):.2e}")


def main():
    smoke = "--smoke" in sys.argv     # CPU: small widths, the kernels interpreted (seconds)
    for hidden, heads in (((64, 4), (128, 2)) if smoke else ((1024, 16), (2048, 16))):
        run(hidden, heads, (12, 7, 12, 5) if smoke else (128, 77, 128, 5), seed=hidden, smoke=smoke)
        run(hidden, heads, (40,) if smoke else (512,), seed=hidden + 1, smoke=smoke)
    print(f"{'ALL PASS' if not FAILS else 'FAILED: ' + ', '.join(FAILS)}", flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
