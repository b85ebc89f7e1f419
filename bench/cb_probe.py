"""Does a call re-record its CUDA graph? XLA's CommandBufferThunk compares the device addresses of the buffer
allocations its commands use with those it recorded, and re-records (updates) the graph's commands when any moved:
a cost per command on the host, paid before the launch. This runs whole requests with XLA's own log of those
updates on (TF_CPP_VMODULE=command_buffer_thunk=3, read back from this process's stderr) and prints, per request,
how many updates ran, how many commands and changed allocations they had, and the host time they took.

    PYTHONUNBUFFERED=1 python bench/cb_probe.py --model 1.3b --cases 1-128-8 [--reps 4] [--set module.ATTR:value ...]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--cases", default="1-128-8")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], help="module globals for the run, each 'module.attr:value' "
                    "(bench/step_ab.py's syntax, as bench/e2e.py --set)")
    a = ap.parse_args()
    # XLA's log goes to fd 2: point fd 2 at a file before XLA loads, read it back after each request
    log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "command_buffer_thunk=3,command_executor=1"
    saved = os.dup(2)
    os.write(saved, f"XLA's log (an abort, e.g. an XLA flag it refuses, leaves its message there): {log.name}\n".encode())
    os.dup2(log.fileno(), 2)

    import jax
    import numpy as np

    from bench.e2e import MODELS, SMOKE_MODELS, random_params
    from bench.step_ab import apply_set_args
    from ftjax.config import ModelConfig
    from ftjax.llm import LLM

    def out(*x):
        os.write(saved, (" ".join(str(v) for v in x) + "\n").encode())

    apply_set_args(a.set)
    cfg = ModelConfig(**{**MODELS, **SMOKE_MODELS}[a.model])
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), random_params(cfg))
    pos = 0

    def read_new():
        nonlocal pos
        with open(log.name, "rb") as f:
            f.seek(pos)
            text = f.read().decode(errors="replace")
            pos = f.tell()
        return text

    upd = re.compile(r"Update command buffer.*?num_commands=(\d+); updated_allocs=(\d+)")
    took = re.compile(r"Updated command buffer in (\d+) .s; num_commands=(\d+)")
    cmds = re.compile(r"Updated (\d+) commands in (\d+) .s \(skipped (\d+)")
    for c in a.cases.split(","):
        b, t_in, t_out = (int(x) for x in c.split("-"))
        llm = LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out, max_beam_width=1)
        rng = np.random.RandomState(0)
        prompts = rng.randint(1, cfg.vocab, size=(b, t_in)).tolist()
        out(f"{a.model} b{b}-{t_in}-{t_out} on {jax.devices()[0].device_kind}, jax {jax.__version__}, sets {a.set}")
        for r in range(a.reps + 2):
            read_new()
            t0 = time.perf_counter()
            llm.generate(prompts, max_new_tokens=t_out, end_id=None)
            ms = 1e3 * (time.perf_counter() - t0)
            text = read_new()
            ups = upd.findall(text)
            tk = took.findall(text)
            out(f"  request {r}{' (warm-up)' if r < 2 else ''}: {ms:7.2f} ms; "
                f"updates {len(ups)}: " + ", ".join(f"{n} cmds/{al} allocs {us} us" for (n, al), (us, _) in
                                                    zip(ups, tk))
                + "; commands updated/skipped: " + ", ".join(f"{int(n) - int(k)}/{k} in {us} us" for n, us, k in
                                                             cmds.findall(text)))
        llm = None
    os.dup2(saved, 2)


if __name__ == "__main__":
    main()
