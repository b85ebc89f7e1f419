"""Offline batch decoding: `python -m ftjax.generate --model PATH --input prompts.jsonl --output out.jsonl`.

Input: one JSON value per line — a list of token ids, or an object with "input_ids" (ids) or "text"
(needs the model folder's `tokenizer.json`); an object may also set "max_new_tokens" and any decoding
keyword of CONTRACTS.md (`top_k`, `temperature`, `random_seed`, `stop_words`, ...) for its own line, over
the command line's flags. Every line is checked against the model before decoding starts, and an error
names the line. Output: one JSON object per input line, in order, with "output_ids" (and "text" when a
tokenizer is present, "cum_log_prob"/"output_log_probs" when asked, "beams" for beam search), written
block by block as the file is decoded. Decoding is continuous: a finished prompt's slots take the next
prompt at once. With no --model the embedded default model is used; with no --input a few demo prompts
are decoded. Prints a progress bar on stderr and the throughput at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np


# JSON keys a line may carry besides its prompt
_LINE_KEYS = ("max_new_tokens",)


def _read_prompts(path: str, tokenizer, with_settings: bool = False):
    """-> prompts (lists of ids); with_settings: (prompts, per-line dicts of max_new_tokens / decoding keys,
    line numbers)."""
    from ftjax.sampling import SamplingParams

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    prompts, settings, lines = [], [], []
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
            own = {}
            if isinstance(obj, dict):
                own = {k: v for k, v in obj.items() if k not in ("input_ids", "text", "index")}
                unknown = sorted(k for k in own if k not in fields and k not in _LINE_KEYS)
                if unknown:
                    raise SystemExit(f"{path}:{n}: unknown key(s) {', '.join(map(repr, unknown))} (a line may set "
                                     f"input_ids or text, max_new_tokens and the decoding keywords)")
            prompts.append(ids)
            settings.append(own)
            lines.append(n)
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return (prompts, settings, lines) if with_settings else prompts


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


def line_params(llm, settings: list[dict], max_new_tokens: int, decoding: dict, where=lambda i: f"line {i + 1}"):
    """Per-line decoding settings over the common ones -> (max_new list, SamplingParams list), each checked
    against the model; SystemExit names the line."""
    from ftjax.sampling import SamplingParams

    max_new, plist = [], []
    for i, own in enumerate(settings):
        kw = {**decoding, **{k: v for k, v in own.items() if k != "max_new_tokens"}}
        m = own.get("max_new_tokens", max_new_tokens)
        try:
            if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
                raise ValueError(f"max_new_tokens: must be a positive integer, got {m!r}")
            plist.append(llm.sampling_params(1, params=[SamplingParams(**kw)])[0])
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{where(i)}: {e}")
        max_new.append(m)
    return max_new, plist


def run(llm, prompts: list[list[int]], max_new_tokens, out, tokenizer=None, progress=True, params=None,
        block: int | None = None, **decoding) -> dict[str, Any]:
    """Decode `prompts`, writing one JSON line per prompt to `out` in order. max_new_tokens: an int or one
    per prompt; params: one SamplingParams per prompt (else the decoding keywords). The prompts go to
    `llm.generate` in blocks (default: 8 x the slots), each decoded continuously; a block's lines are written
    when it ends, so a long file's results reach `out` as it goes."""
    n = len(prompts)
    mx = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    if params is None:
        params = llm.sampling_params(n, **decoding)
    bar = Progress(n) if progress else None
    block = block or 8 * llm.max_batch_size
    total = 0
    for start in range(0, n, block):
        end = min(n, start + block)
        seen = [0, 0]

        def tick(done, tokens, seen=seen):
            if bar:
                bar.update(done - seen[0], tokens - seen[1])
            seen[:] = [done, tokens]

        res = llm.generate(prompts[start:end], max_new_tokens=mx[start:end], params=params[start:end],
                           progress=tick)
        for j in range(end - start):
            rec: dict[str, Any] = {"index": start + j, "input_ids": list(prompts[start + j]), "output_ids": res.tokens[j]}
            if tokenizer is not None:
                rec["text"] = tokenizer.decode(res.tokens[j])
            if params[start + j].return_log_probs:
                rec["cum_log_prob"] = res.cum_log_probs[j]
                rec["output_log_probs"] = res.output_log_probs[j]
            if params[start + j].beam_width > 1:
                rec["beams"] = res.beams[j]
            out.write(json.dumps(rec) + "\n")
        out.flush()
        total += sum(res.sequence_lengths)
    if bar:
        bar.finish()
    return {"prompts": n, "tokens": total}


def _words(text: str):
    """A word-list flag: JSON, e.g. '[[13, 198], [50256]]' (FT's [2, L] encoding is accepted as well)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, e.g. '[[13, 198]]' ({e})")


def _widest_beam(flag, settings) -> int:
    """The engine's max_beam_width for a file: 4, or the widest beam_width the flag or a line asks for."""
    asked = [flag or 1] + [o["beam_width"] for o in settings or [] if isinstance(o.get("beam_width"), int)]
    return max([4] + asked)


# decoding keywords taken as flags (--end-id and --return-log-probs apart): scalars, and JSON lists
_SCALAR_FLAGS = (("top_k", int), ("top_p", float), ("temperature", float), ("repetition_penalty", float),
                 ("presence_penalty", float), ("min_length", int), ("len_penalty", float), ("beam_width", int),
                 ("beam_search_diversity_rate", float), ("random_seed", int), ("start_id", int),
                 ("top_p_decay", float), ("top_p_min", float))
_LIST_FLAGS = ("stop_words", "bad_words", "top_p_reset_ids")
_MODEL_EOS = object()   # --end-id not given: the model's eos


def _end_id(text: str):
    return None if text.lower() == "none" else int(text)


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
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-embed"], help="weight-only INT8")
    ap.add_argument("--max-beam-width", type=int, default=None,
                    help="the widest beam a line may ask for (default: 4, or --beam-width when wider)")
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--pipeline-parallel", type=int, default=1)
    ap.add_argument("--compile-cache", default=None,
                    help="jax's persistent compilation cache dir (default ~/.cache/ftjax/jax; 'off' for none)")
    d = ap.add_argument_group("decoding (CONTRACTS.md's keywords; a line's own keys override them)")
    for name, typ in _SCALAR_FLAGS:
        d.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    d.add_argument("--end-id", type=_end_id, default=_MODEL_EOS, help="default: the model's eos; 'none': never end")
    d.add_argument("--stop-words", type=_words, default=None, help="JSON list of token sequences")
    d.add_argument("--bad-words", type=_words, default=None, help="JSON list of token sequences")
    d.add_argument("--top-p-reset-ids", type=_words, default=None, help="JSON list of ids")
    d.add_argument("--return-log-probs", action="store_true")
    args = ap.parse_args(argv)

    # The input is read (and a bad line refused) before the model loads: the tokenizer comes from the model
    # folder, not from the loaded model, so a malformed file fails in a second rather than after the load.
    tok = _tokenizer(args.model)
    prompts, settings, lines = (None, None, None) if args.input is None else _read_prompts(args.input, tok, True)
    decoding: dict[str, Any] = {k: getattr(args, k) for k in [n for n, _ in _SCALAR_FLAGS] + list(_LIST_FLAGS)
                                if getattr(args, k) is not None}
    if args.end_id is not _MODEL_EOS:
        decoding["end_id"] = args.end_id
    if args.return_log_probs:
        decoding["return_log_probs"] = True
    try:   # the common settings alone, before the model loads
        from ftjax.sampling import SamplingParams

        SamplingParams(**decoding)
    except (TypeError, ValueError) as e:
        print(f"ftjax.generate: {e}", file=sys.stderr)
        return 2

    import ftjax

    if args.compile_cache != "off":
        from ftjax import compile_cache

        compile_cache.enable(args.compile_cache)
    try:
        llm = ftjax.load(args.model, dtype=args.dtype, max_batch_size=args.max_batch_size,
                         max_seq_len=args.max_seq_len, attention=args.attention, quantize=args.quantize,
                         max_beam_width=args.max_beam_width or _widest_beam(args.beam_width, settings),
                         tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel)
    except (ValueError, FileNotFoundError) as e:
        print(f"ftjax.generate: {e}", file=sys.stderr)
        return 2
    if prompts is None:
        rng = np.random.RandomState(0)
        prompts = [rng.randint(0, llm.cfg.vocab, size=rng.randint(4, 33)).tolist() for _ in range(16)]
        settings = [{} for _ in prompts]
        print(f"ftjax.generate: no --input; decoding {len(prompts)} random demo prompts", file=sys.stderr)
    # every line against the model before any decoding: a bad line 10,000 fails now, not after an hour
    where = lambda i: f"{args.input}:{lines[i]}" if lines else f"prompt {i}"  # noqa: E731
    max_new, plist = line_params(llm, settings, args.max_new_tokens, decoding, where)
    for i, p in enumerate(prompts):
        try:
            llm.engine.check_prompt(p, max_new[i], field="input_ids")
        except ValueError as e:
            print(f"ftjax.generate: {where(i)}: {e}", file=sys.stderr)
            return 2
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        run(llm, prompts, max_new, out, tokenizer=tok, params=plist)
    except ValueError as e:
        print(f"ftjax.generate: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
