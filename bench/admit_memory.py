"""Device memory a request takes beyond the engine's own arrays (weights, K/V cache, state): the peak of
one `LLM.generate` over what was in use before it, for one case per process (memory statistics are per
process, and the peak only grows).

    PYTHONUNBUFFERED=1 python bench/admit_memory.py --case 6.7b-64-512-32 --weights int8 \
        [--set ftjax.layers.linear.INT8_DEQUANT_ROWS:none]

Made to check that the int8 engine's dequantised prefill (`linear.INT8_DEQUANT_ROWS`: big prefills convert
each int8 weight into a 16-bit copy before a plain GEMM) keeps one layer's copy alive at a time, not a
16-bit copy of the model. Random weights are made (and quantized) before the engine, so their transient
peak is recorded first; the script says whether the request went above it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="6.7b-64-512-32", help="model-batch-prompt-output")
    ap.add_argument("--weights", default="int8", help="bf16 or int8")
    ap.add_argument("--set", nargs="*", default=[], help="'module.attr:value' switches (as step_ab's '@' items)")
    ap.add_argument("--json", default=None, help="append the row to this file")
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.common import device_info, emit_row
    from bench.e2e import MODELS, SMOKE_MODELS, nbytes, random_params
    from bench.step_ab import apply_set_args
    from ftjax.config import ModelConfig

    apply_set_args(a.set)
    name, b, t_in, t_out = a.case.rsplit("-", 3)
    b, t_in, t_out = int(b), int(t_in), int(t_out)
    cfg = ModelConfig(**{**MODELS, **SMOKE_MODELS}[name])
    dev = jax.devices()[0]
    gib = lambda v: None if v is None else round(v / 2**30, 3)  # noqa: E731

    def stats():
        s = dev.memory_stats() or {}
        return s.get("bytes_in_use"), s.get("peak_bytes_in_use")

    params = random_params(cfg)
    if a.weights == "int8":
        from ftjax import quantize as Q
        params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16)
    jax.block_until_ready(params)
    llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out, max_beam_width=1)
    del params
    rng = np.random.RandomState(0)
    prompts = rng.randint(1, cfg.vocab, size=(b, t_in)).tolist()
    llm.generate(prompts[:1], max_new_tokens=2, end_id=None)     # state allocated, a small prefill compiled
    used0, peak0 = stats()
    llm.generate(prompts, max_new_tokens=t_out, end_id=None)
    used1, peak1 = stats()
    row = {"case": a.case, "weights": a.weights, "sets": a.set, "device": device_info(), "jax": jax.__version__,
           "weight_gib": gib(nbytes(llm.engine.params)), "state_gib": gib(nbytes(llm._state)),
           "in_use_before_gib": gib(used0), "peak_before_gib": gib(peak0), "peak_after_gib": gib(peak1),
           "in_use_after_gib": gib(used1)}
    if None not in (used0, peak0, peak1):
        row["request_set_the_peak"] = peak1 > peak0
        row["request_above_in_use_gib"] = gib(peak1 - used0) if peak1 > peak0 else f"<= {gib(peak0 - used0)}"
    emit_row(row, a.json)


if __name__ == "__main__":
    main()
