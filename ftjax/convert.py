"""`python -m ftjax.convert SRC DST [--dtype float32|bfloat16|float16] [--quantize int8|int8-embed]`

Reads any checkpoint ftjax understands (HF GPT-2 directory, Megatron-LM `model_optim_rng.pt` shards,
FasterTransformer converted folder, or an ftjax checkpoint), checks every key and shape, and writes
ftjax's orbax checkpoint to DST. Progress goes to stderr, one line per shard / layer, then a summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from ftjax.config import DTYPES


def _log(msg: str) -> None:
    print(f"[ftjax.convert] {msg}", file=sys.stderr, flush=True)


def convert(src: str, dst: str, dtype: str = "float32", quantize: str | None = None,
            num_heads: int | None = None, progress=_log) -> dict:
    """Converts SRC to an ftjax checkpoint at DST; returns a summary dict."""
    from ftjax.checkpoint import detect_format, load_checkpoint, orbax_io

    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {DTYPES}")
    if quantize is not None:
        from ftjax.quantize import check_mode

        check_mode(quantize)
    if os.path.exists(os.path.join(dst, orbax_io.PARAMS_DIR)):
        raise ValueError(f"{dst}: already holds an ftjax checkpoint; choose an empty destination")
    t0 = time.perf_counter()
    fmt = detect_format(src)
    progress(f"source {src}: format {fmt}")
    kwargs = {"num_heads": num_heads} if (fmt == "megatron" and num_heads) else {}
    cfg, params = load_checkpoint(src, progress=progress, **kwargs)
    t1 = time.perf_counter()
    if quantize is not None:  # host numpy: per-output-channel int8 + float32 scales (stored in `dtype`)
        from ftjax import quantize as q
        params = q.quantize_params(params, cfg, mode=quantize, progress=progress)
    leaves = jax.tree.leaves(params)
    progress(f"writing {len(leaves)} arrays as {dtype} to {dst}")
    orbax_io.save(dst, cfg, params, dtype)
    t2 = time.perf_counter()
    n_params = int(sum(np.prod(np.shape(x)) for x in leaves))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    summary = {"source": src, "format": fmt, "destination": dst, "dtype": dtype, "quantize": quantize,
               "params": n_params,
               "layers": cfg.num_layers, "hidden": cfg.hidden, "vocab_size": cfg.vocab_size,
               "bytes_written": size, "read_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2)}
    progress(f"done: {fmt} -> ftjax, {n_params:,} params in {cfg.num_layers} layers "
             f"(d={cfg.hidden}, vocab={cfg.vocab_size}), {dtype}{' + int8' if quantize else ''}, {size / 2**20:.1f} MiB written; "
             f"read {t1 - t0:.1f}s, write {t2 - t1:.1f}s")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftjax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF / Megatron / FasterTransformer / ftjax checkpoint")
    ap.add_argument("dst", help="destination directory for the ftjax (orbax) checkpoint")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype (default float32)")
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-embed"],
                    help="int8: weight-only INT8 of the attention/MLP projections (per-output-channel scales); "
                         "int8-embed: also the token embedding (per-row scales; the tied output head reads it)")
    ap.add_argument("--num-heads", type=int, default=None,
                    help="Megatron checkpoints without pickled args only (16 for the 345M release)")
    a = ap.parse_args(argv)
    try:
        convert(a.src, a.dst, a.dtype, a.quantize, a.num_heads)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"ftjax.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
