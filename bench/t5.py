"""T5 decoding throughput (GPU): ftjax beside HF transformers on the same work, in the same run.

    python bench/t5.py [--batches 1,128] [--modes beam4,topk4] [--in-len 32:128] [--out-len 128]
                       [--reps 3] [--no-hf] [--json out.json] [--smoke]

Model: T5-base shape (12 + 12 layers, d_model 768, 12 heads of d_kv 64, d_ff 3072, vocab 32128, ReLU,
tied head), random bf16 weights (ftjax: seeded init; HF: its own random init — the work per token does not
depend on the values). Work: `batch` prompts of random ids, lengths uniform in --in-len (seeded, the same
prompts for both), `--out-len` generated tokens each with no early end (ftjax end_id=None; HF
min_new_tokens = max_new_tokens, so EOS is never chosen). Modes: beam4 = beam search width 4 (ftjax
beam_width=4; HF num_beams=4), topk4 = sampling with top_k 4 (ftjax top_k=4; HF do_sample=True, top_k=4).
tokens/s = output tokens of beam 0 / wall seconds of one `llm.generate` / `model.generate` call (encoder
included), the median of --reps timed calls after one warm-up call (compiles); ftjax's generate returns host
lists and HF's timing is bracketed by torch.cuda.synchronize(), so both are device-synchronised.
ftjax runs with max_batch_size = batch * beam width (one K/V row per beam), max_seq_len = the longer of the
input and output (+1), attention "auto" (Pallas on GPU).

Prints a markdown table; writes JSON to --json and, when $OUT is set, to $OUT/t5_bench.json.
FT's published anchor (A100-40GB fp16, T5-base, beam 4): batch 1 671 tokens/s against HF's 44; batch 128
11,312 tokens/s. --smoke: a tiny model on whatever devices exist (CPU is fine), to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = dict(vocab_size=32128, hidden=768, head_dim=64, ffn_dim=3072, num_heads=12, num_encoder_layers=12,
            num_decoder_layers=12, relative_buckets=32, relative_max_distance=128, activation="relu",
            gated_ffn=False, tie_embeddings=True, scale_logits=True, max_positions=512)
SMOKE = dict(BASE, vocab_size=256, hidden=64, head_dim=16, ffn_dim=128, num_heads=4, num_encoder_layers=2,
             num_decoder_layers=2)
FT_ANCHOR = {(1, "beam4"): 671, (128, "beam4"): 11312}
HF_ANCHOR = {(1, "beam4"): 44}


def prompts_for(batch, lo, hi, vocab, seed):
    rng = np.random.RandomState(seed)
    return [rng.randint(2, vocab, size=rng.randint(lo, hi + 1)).tolist() for _ in range(batch)]


def mode_kwargs(mode):
    if mode == "beam4":
        return 4, dict(beam_width=4)
    if mode == "topk4":
        return 1, dict(top_k=4, random_seed=1)
    raise ValueError(f"--modes: unknown {mode!r} (beam4, topk4)")


def bench_ftjax(cfg, params, prompts, out_len, mode, dtype, reps):
    from ftjax.llm import LLM

    width, kw = mode_kwargs(mode)
    S = max(max(len(p) for p in prompts), out_len + 1)
    llm = LLM(cfg, params, dtype=dtype, max_batch_size=len(prompts) * width, max_seq_len=S, attention="auto",
              max_beam_width=width)
    t0 = time.perf_counter()
    res = llm.generate(prompts, max_new_tokens=out_len, end_id=None, **kw)  # warm-up: compiles
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = llm.generate(prompts, max_new_tokens=out_len, end_id=None, **kw)
        times.append(time.perf_counter() - t0)
    toks = sum(len(t) for t in res.tokens)
    del llm
    return dict(seconds=statistics.median(times), times=times, tokens=toks, warmup_s=warm)


def bench_hf(cfg, prompts, out_len, mode, reps, device, torch_dtype, seed=0):
    import torch
    import transformers

    width, _ = mode_kwargs(mode)
    hcfg = transformers.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.hidden, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
                                 num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
                                 num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_buckets,
                                 relative_attention_max_distance=cfg.relative_max_distance, feed_forward_proj="relu",
                                 tie_word_embeddings=True, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(hcfg).to(torch_dtype).eval()
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len)
    if mode == "beam4":
        kw.update(num_beams=4, do_sample=False, early_stopping=False, top_k=None, top_p=None)
    else:
        kw.update(num_beams=1, do_sample=True, top_k=4, top_p=None)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, **kw)

    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
    toks = int(out.shape[0] * (out.shape[1] - 1))  # one sequence per prompt (beam 0), minus the start id
    model = None   # free the weights before the next case (a name the nested run() still refers to)
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(seconds=statistics.median(times), times=times, tokens=toks, warmup_s=warm)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/t5.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="comma list (default 1,128; smoke 1,4)")
    ap.add_argument("--modes", default="beam4,topk4", help="comma list of beam4, topk4")
    ap.add_argument("--in-len", default=None, help="LO:HI encoder input lengths (default 32:128; smoke 4:12)")
    ap.add_argument("--out-len", type=int, default=None, help="generated tokens (default 128; smoke 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="ftjax dtype (default bfloat16; smoke float32)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, tiny work: checks the script on CPU")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from ftjax.config import T5Config
    from ftjax.models import t5

    smoke = a.smoke
    batches = [int(x) for x in (a.batches or ("1,4" if smoke else "1,128")).split(",")]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        mode_kwargs(m)
    lo, hi = (int(x) for x in (a.in_len or ("4:12" if smoke else "32:128")).split(":"))
    out_len = a.out_len or (8 if smoke else 128)
    dtype = a.dtype or ("float32" if smoke else "bfloat16")
    cfg = T5Config(**(SMOKE if smoke else BASE))
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
    params = t5.init_params(cfg, seed=0, dtype=jdt)

    hf_device, torch_dtype = None, None
    if not a.no_hf:
        import torch

        hf_device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if hf_device == "cpu" and not smoke:
            print("note: torch has no CUDA here; HF runs on CPU", file=sys.stderr)

    dev = jax.devices()[0]
    meta = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "dtype": dtype, "model": "smoke" if smoke else "t5-base shape",
            "config": cfg.to_dict(), "in_len": [lo, hi], "out_len": out_len, "reps": a.reps,
            "date": time.strftime("%Y-%m-%d")}
    if not a.no_hf:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__, hf_device=hf_device,
                    hf_device_name=torch.cuda.get_device_name(0) if hf_device == "cuda" else "cpu")
    rows = []
    for b in batches:
        prompts = prompts_for(b, lo, hi, cfg.vocab_size, seed=b)
        for m in modes:
            r = dict(batch=b, mode=m)
            f = bench_ftjax(cfg, params, prompts, out_len, m, dtype, a.reps)
            r["ftjax"] = dict(f, tokens_per_s=f["tokens"] / f["seconds"])
            print(f"[t5 bench] batch {b} {m}: ftjax {r['ftjax']['tokens_per_s']:.0f} tok/s "
                  f"({f['seconds'] * 1e3:.1f} ms, warm-up {f['warmup_s']:.1f} s)", file=sys.stderr, flush=True)
            if not a.no_hf:
                h = bench_hf(cfg, prompts, out_len, m, a.reps, hf_device, torch_dtype)
                r["hf"] = dict(h, tokens_per_s=h["tokens"] / h["seconds"])
                print(f"[t5 bench] batch {b} {m}: HF {r['hf']['tokens_per_s']:.0f} tok/s "
                      f"({h['seconds'] * 1e3:.1f} ms)", file=sys.stderr, flush=True)
            rows.append(r)

    print(f"\nT5 ({meta['model']}), {dtype}, input {lo}-{hi} ids, {out_len} output tokens, no early end; "
          f"{meta['device']}, jax {meta['jax']}" + (f", HF transformers {meta['transformers']} on {meta['hf_device_name']}"
                                                    if not a.no_hf else ""))
    print("\n| batch | decoding | ftjax tokens/s | ftjax s/call | HF tokens/s | HF s/call | ftjax / HF | FT anchor (A100 fp16) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, h = r["ftjax"], r.get("hf")
        anchor = FT_ANCHOR.get((r["batch"], r["mode"]))
        hfa = HF_ANCHOR.get((r["batch"], r["mode"]))
        anchor_s = "" if smoke or anchor is None else f"{anchor:,}" + (f" (HF {hfa})" if hfa else "")
        print(f"| {r['batch']} | {r['mode']} | {f['tokens_per_s']:,.0f} | {f['seconds']:.3f} | "
              + (f"{h['tokens_per_s']:,.0f} | {h['seconds']:.3f} | {f['tokens_per_s'] / h['tokens_per_s']:.1f}x | "
                 if h else "- | - | - | ") + f"{anchor_s} |")
    result = {"meta": meta, "rows": rows}
    paths = [a.json] if a.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "t5_bench.json"))
    for p in paths:
        with open(p, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
