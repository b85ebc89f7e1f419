"""Offline batch decoding: `python -m ftjax.generate --model PATH --input prompts.jsonl --output out.jsonl`.

Input: one JSON value per line — a list of token ids, or an object with "input_ids" (ids) or "text"
(needs the model folder's `tokenizer.json`). Output: one JSON object per input line, in order, with
"output_ids" (and "text" when a tokenizer is present, "cum_log_prob"/"output_log_probs" when asked).
With no --model the embedded default model is used; with no --input a few demo prompts are decoded.
Prints a progress bar on stderr and the throughput at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _read_prompts(path: str, tokenizer) -> list[list[int]]:
    prompts = []
    with (sys.stdin if path == "-" else open(path)) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e})")
            if isinstance(obj, list):
                ids = obj
            elif isinstance(obj, dict) and "input_ids" in obj:
                ids = obj["input_ids"]
            elif isinstance(obj, dict) and "text" in obj:
                if tokenizer is None:
                    raise SystemExit(f"{path}:{n}: has \"text\" but the model folder has no tokenizer.json")
                ids = tokenizer.encode(obj["text"]).ids
            else:
                raise SystemExit(f"{path}:{n}: expected a list of ids or an object with \"input_ids\" or \"text\"")
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise SystemExit(f"{path}:{n}: input_ids must be a list of integers")
            prompts.append(ids)
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def _tokenizer(model_path: str | None):
    if model_path is None or not os.path.exists(os.path.join(model_path, "tokenizer.json")):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))


class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.tokens, self.stream = total, 0, 0, stream
        self.t0 = time.perf_counter()

    def update(self, prompts: int, tokens: int):
        self.done += prompts
        self.tokens += tokens
        dt = time.perf_counter() - self.t0
        width = 30
        fill = int(width * self.done / self.total)
        self.stream.write(f"\r[{'=' * fill}{' ' * (width - fill)}] {self.done}/{self.total} prompts, "
                          f"{self.tokens} tokens, {self.tokens / max(dt, 1e-9):.1f} tok/s")
        self.stream.flush()

    def finish(self):
        dt = time.perf_counter() - self.t0
        self.stream.write(f"\ndone: {self.done} prompts, {self.tokens} generated tokens in {dt:.2f} s "
                          f"({self.tokens / max(dt, 1e-9):.1f} tokens/s, {self.done / max(dt, 1e-9):.2f} prompts/s)\n")
        self.stream.flush()


def run(llm, prompts: list[list[int]], max_new_tokens: int, out, tokenizer=None, progress=True,
        **decoding) -> dict[str, Any]:
    """Decode `prompts` in batches of llm.max_batch_size, writing one JSON line per prompt to `out`."""
    bar = Progress(len(prompts)) if progress else None
    B = llm.max_batch_size
    total = 0
    for start in range(0, len(prompts), B):
        chunk = prompts[start:start + B]
        res = llm.generate(chunk, max_new_tokens=max_new_tokens, **decoding)
        for j, p in enumerate(chunk):
            rec: dict[str, Any] = {"index": start + j, "input_ids": p, "output_ids": res.tokens[j]}
            if tokenizer is not None:
                rec["text"] = tokenizer.decode(res.tokens[j])
            if res.cum_log_probs is not None:
                rec["cum_log_prob"] = res.cum_log_probs[j]
                rec["output_log_probs"] = res.output_log_probs[j]
            if res.beams is not None:
                rec["beams"] = res.beams[j]
            out.write(json.dumps(rec) + "\n")
        n = sum(res.sequence_lengths)
        total += n
        if bar:
            bar.update(len(chunk), n)
    if bar:
        bar.finish()
    return {"prompts": len(prompts), "tokens": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftjax.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (HF, Megatron, FT-converted or ftjax); "
                    "default: the embedded default model")
    ap.add_argument("--input", default=None, help="prompts .jsonl ('-' for stdin); default: demo prompts")
    ap.add_argument("--output", default="-", help="results .jsonl ('-' for stdout)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--attention", default="auto", choices=["auto", "pallas", "xla"])
    ap.add_argument("--end-id", type=int, default=None, help="default: the model's eos")
    ap.add_argument("--return-log-probs", action="store_true")
    args = ap.parse_args(argv)

    # The input is read (and a bad line refused) before the model loads: the tokenizer comes from the model
    # folder, not from the loaded model, so a malformed file fails in a second rather than after the load.
    tok = _tokenizer(args.model)
    prompts = None if args.input is None else _read_prompts(args.input, tok)

    import ftjax

    llm = ftjax.load(args.model, dtype=args.dtype, max_batch_size=args.max_batch_size,
                     max_seq_len=args.max_seq_len, attention=args.attention)
    if prompts is None:
        rng = np.random.RandomState(0)
        prompts = [rng.randint(0, llm.cfg.vocab, size=rng.randint(4, 33)).tolist() for _ in range(16)]
        print(f"ftjax.generate: no --input; decoding {len(prompts)} random demo prompts", file=sys.stderr)
    decoding: dict[str, Any] = {}
    if args.end_id is not None:
        decoding["end_id"] = args.end_id
    if args.return_log_probs:
        decoding["return_log_probs"] = True
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        run(llm, prompts, args.max_new_tokens, out, tokenizer=tok, **decoding)
    except ValueError as e:
        print(f"ftjax.generate: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
