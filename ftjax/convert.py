"""`python -m ftjax.convert SRC DST [--dtype float32|bfloat16|float16] [--quantize int8|int8-embed]`

Reads any checkpoint ftjax understands (HF GPT-2 directory, Megatron-LM `model_optim_rng.pt` shards,
FasterTransformer converted folder, or an ftjax checkpoint), checks every key and shape, and writes
ftjax's orbax checkpoint to DST, a new or empty directory (checked before SRC is read). Progress goes to
stderr: one line per file / shard / layer read, the write's size before and after (and every 10 s while
it runs), then a summary. Bad input is one `ftjax.convert: error: ...` line naming the file, exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time

import jax
import numpy as np

from ftjax.config import DTYPES


def _log(msg: str) -> None:
    print(f"[ftjax.convert] {msg}", file=sys.stderr, flush=True)


def _du(path: str) -> int:
    total = 0
    for r, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(r, f))
            except OSError:   # orbax renames its temporary files while we look
                pass
    return total


@contextlib.contextmanager
def _heartbeat(progress, dst: str, approx: int, every_s: float = 10.0):
    """While the body runs, a line every `every_s` seconds with the bytes written under `dst` so far."""
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(every_s):
            progress(f"  ... still writing: {_du(dst) / 2**20:.1f} of about {approx / 2**20:.1f} MiB on disk, "
                     f"{time.perf_counter() - t0:.0f}s")

    th = threading.Thread(target=beat, name="ftjax-convert-progress", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def check_destination(src: str, dst: str) -> None:
    """DST must be new, or an empty directory; not a file, not SRC itself or inside it, not a directory
    holding anything (an ftjax checkpoint or other files). ValueError naming DST otherwise."""
    from ftjax.checkpoint import orbax_io

    d, s = os.path.realpath(dst), os.path.realpath(src)
    if d == s or d.startswith(s.rstrip(os.sep) + os.sep):
        raise ValueError(f"{dst}: the destination is the source {src} or inside it; choose a new directory")
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"{dst}: exists and is not a directory; choose an empty or new destination directory")
    if os.path.isdir(d):
        entries = sorted(os.listdir(d))
        if os.path.exists(os.path.join(d, orbax_io.PARAMS_DIR)):
            raise ValueError(f"{dst}: already holds an ftjax checkpoint; choose an empty destination")
        if entries:
            shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
            raise ValueError(f"{dst}: the destination directory is not empty (it holds {shown}); "
                             "choose an empty or new destination")
        if not os.access(d, os.W_OK):
            raise ValueError(f"{dst}: the destination directory is not writable")
        return
    parent = os.path.dirname(d)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and (not os.path.isdir(parent) or not os.access(parent, os.W_OK)):
        raise ValueError(f"{dst}: cannot create the destination: {parent} is not a writable directory")


def convert(src: str, dst: str, dtype: str = "float32", quantize: str | None = None,
            num_heads: int | None = None, progress=_log) -> dict:
    """Converts SRC to an ftjax checkpoint at DST; returns a summary dict."""
    from ftjax.checkpoint import detect_format, load_checkpoint, orbax_io

    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {DTYPES}")
    if quantize is not None:
        from ftjax.quantize import check_mode

        check_mode(quantize)
    check_destination(src, dst)   # before the (long) read of the source
    t0 = time.perf_counter()
    fmt = detect_format(src)
    progress(f"source {src}: format {fmt}")
    kwargs = {"num_heads": num_heads} if (fmt == "megatron" and num_heads) else {}
    try:
        cfg, params = load_checkpoint(src, progress=progress, **kwargs)
    except FileNotFoundError:
        raise
    except (KeyError, OSError, EOFError, UnicodeDecodeError) as e:   # a reader's check that named nothing
        raise ValueError(f"{src}: cannot read the {fmt} checkpoint ({type(e).__name__}: {e})") from None
    t1 = time.perf_counter()
    if quantize is not None:  # host numpy: per-output-channel int8 + float32 scales (stored in `dtype`)
        from ftjax import quantize as q
        params = q.quantize_params(params, cfg, mode=quantize, progress=progress)
    leaves = jax.tree.leaves(params)
    n_params = int(sum(np.prod(np.shape(x)) for x in leaves))
    approx = n_params * np.dtype(orbax_io._np_dtype(dtype)).itemsize
    progress(f"writing {len(leaves)} arrays ({n_params:,} values, about {approx / 2**20:.1f} MiB as {dtype}) "
             f"to {dst}")
    with _heartbeat(progress, dst, approx):
        orbax_io.save(dst, cfg, params, dtype)
    t2 = time.perf_counter()
    size = _du(dst)
    progress(f"wrote {size / 2**20:.1f} MiB to {dst} in {t2 - t1:.1f}s")
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
