"""Programmatic dependent launch (`ftjax.pallas._common.PDL`) on the GPU: with the grid-dependency wait in
every decode kernel the models must decode exactly as without it (same kernels, same order of arithmetic:
bitwise equal tokens and log probs), GPT-2-like and LLaMA-like, bf16 and int8 weights, batch 1 and 8. (That
a chain of dependent kernels loses no update is bench/pdl_probe.py's `value_ok`.)

  PYTHONUNBUFFERED=1 python tests/gpu/check_pdl.py [--on 'module.attr:value' ...]

--on: module globals set for the "on" decode besides PDL (e.g. 'ftjax.pallas._common.PDL_TRIGGER_FIRST:True'):
the tokens and log probs must still be bitwise equal to the decode without PDL.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from check_model import FAILS, report  # noqa: E402


ON_SETS: list = []


def decode(cfg, params, prompts, pdl, quantize, steps):
    import jax

    import ftjax
    from bench.step_ab import apply_set_args, apply_sets
    from ftjax import quantize as Q
    from ftjax.pallas import _common as C

    C.PDL = pdl
    old = apply_set_args(ON_SETS) if pdl and ON_SETS else []
    jax.clear_caches()
    try:
        if quantize:
            params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16)
        llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=len(prompts), max_seq_len=256)
        r = llm.generate(prompts, steps, return_log_probs=True)
        return np.asarray(r.tokens), np.asarray(r.output_log_probs, np.float32)
    finally:
        apply_sets(old)


def main():
    from bench.e2e import random_params
    from ftjax.config import ModelConfig

    shapes = {
        "gpt2-like": dict(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, ffn_dim=4096, max_positions=512),
        "llama-like": dict(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, num_kv_heads=4, ffn_dim=2816,
                           max_positions=512, norm="rmsnorm", position="rotary", activation="silu", gated_ffn=True,
                           tie_embeddings=False, attn_bias=False, mlp_bias=False),
    }
    rng = np.random.RandomState(0)
    for name, kw in shapes.items():
        try:
            cfg = ModelConfig(**kw)
        except TypeError as e:   # a field name this config does not have: report, go on
            report(f"pdl {name} config", False, str(e))
            continue
        params = random_params(cfg)
        for quantize in (None, "int8"):
            for b in (1, 8):
                prompts = [rng.randint(2, cfg.vocab_size, size=int(rng.randint(5, 60))).tolist() for _ in range(b)]
                t0, l0 = decode(cfg, params, prompts, False, quantize, 24)
                t1, l1 = decode(cfg, params, prompts, True, quantize, 24)
                same = t0.shape == t1.shape and bool((t0 == t1).all()) and bool(np.array_equal(l0, l1))
                report(f"pdl {name} {quantize or 'bf16'} b{b}", same,
                       f"tokens equal {bool((t0 == t1).all())}, max |dlogp| {float(np.max(np.abs(l0 - l1))):.3g}")
    print("ALL PASS" if not FAILS else f"FAILED: {FAILS}", flush=True)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--on", nargs="*", default=[], help="module.attr:value set for the PDL-on decode")
    ON_SETS.extend(ap.parse_args().on)
    main()
