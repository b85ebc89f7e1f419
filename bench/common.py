"""Timing helpers for the GPU benchmarks (device-synchronised, warmed up, median of repeats).

`time_call(fn, arg_sets)`: one jitted program runs `fn` once on each of the `arg_sets`, the
host blocks on the result, and the median over repeats of (wall time / len(arg_sets)) is the
time of one call. Callers make the sets distinct (each call gets its own small query array, so
XLA cannot merge calls) and rotate the big inputs among enough buffers that together exceed the
L2, and put enough calls in one program (>= ~2 ms of device work) that launch and host-sync
overhead is amortised and the clocks stay up.
"""
from __future__ import annotations

import glob
import gzip
import json
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

L2_BYTES = 50 * 2**20   # H100: 50 MB of L2


def emit_row(row: dict, path: str | None = None, indent: int | None = None) -> None:
    """A benchmark's result row: printed as JSON (flushed) and, with `path`, appended to that file as one line."""
    print(json.dumps(row, indent=indent), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def n_rotations(bytes_per_set: int, cap: int = 32) -> int:
  """Input sets needed so the sets together are >= 3x the L2 (at least 1, at most cap)."""
  return max(1, min(cap, math.ceil(3 * L2_BYTES / max(1, bytes_per_set))))


def calls_per_program(est_seconds: float, rotations: int, target_s: float = 2e-3,
                      cap: int = 64) -> int:
  """Calls in one timed program: a multiple of `rotations`, about target_s of work, <= cap."""
  n = max(rotations, min(cap, math.ceil(target_s / max(est_seconds, 1e-7))))
  return max(rotations, (n // rotations) * rotations)


def block(x):
  return jax.block_until_ready(x)


def time_call(fn, arg_sets, *, reps: int = 10, warmup: int = 2, min_time_s: float = 0.0):
  """Median seconds of one call of fn over the rotated arg_sets. Returns (seconds, outputs)."""
  multi = jax.jit(lambda sets: [fn(*a) for a in sets])
  out = block(multi(arg_sets))
  for _ in range(warmup):
    block(multi(arg_sets))
  times = []
  t_end = time.perf_counter() + min_time_s
  while len(times) < reps or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    block(multi(arg_sets))
    times.append((time.perf_counter() - t0) / len(arg_sets))
    if len(times) > 200:
      break
  return statistics.median(times), out


def copy_bandwidth(nbytes: int = 2 * 2**30) -> dict:
  """Device copy bandwidth in bytes/s (bytes read plus bytes written) of a few streaming ops.

  Each is timed as 4 calls per program with distinct scalars (no merging); the best is the
  figure the targets use."""
  res = {}
  for name, dtype in [("bf16 a+c", jnp.bfloat16), ("f32 a*c", jnp.float32)]:
    n = nbytes // jnp.dtype(dtype).itemsize
    x = jax.random.normal(jax.random.key(0), (n,), dtype)
    sets = [(x, jnp.asarray(1 + i, dtype)) for i in range(4)]
    f = (lambda a, c: a + c) if "+" in name else (lambda a, c: a * c)
    t, _ = time_call(f, sets, reps=10)
    res[name] = 2 * nbytes / t
    del x, sets
  return res


def device_info() -> str:
  d = jax.devices()[0]
  return f"{d.device_kind} ({d.platform}), jax {jax.__version__}"


def matmul_rate(n: int = 8192, dtype=jnp.bfloat16, sets: int = 3) -> float:
  """Dense matmul rate in FLOP/s of an n x n x n `jnp.dot` (bf16 in, f32 accumulation), timed over
  `sets` distinct operand pairs per program (no merging)."""
  ks = jax.random.split(jax.random.key(1), 2 * sets)
  arg_sets = [(jax.random.normal(ks[2 * i], (n, n), dtype), jax.random.normal(ks[2 * i + 1], (n, n), dtype))
              for i in range(sets)]
  t, _ = time_call(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype), arg_sets,
                   reps=5)
  del arg_sets
  return 2.0 * n ** 3 / t


def perfetto_events(path: str):
  """A Perfetto JSON trace (.json or .json.gz) -> (events, process names by pid, thread names by
  (pid, tid))."""
  with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
    tr = json.load(f)
  events = tr["traceEvents"] if isinstance(tr, dict) else tr
  pname, tname = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = e["args"].get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e.get("tid"))] = e["args"].get("name", "")
  return events, pname, tname


def host_profile_options():
  """Profiler options that trace the host too: XLA runtime TraceMe events (level 2) and Python calls."""
  opts = jax.profiler.ProfileOptions()
  opts.host_tracer_level = 2
  opts.python_tracer_level = 1
  return opts


def perfetto_file(tdir: str, save: str | None = None) -> str | None:
  """The Perfetto JSON a profile wrote under tdir (None if none), copied to `save` when given."""
  files = glob.glob(os.path.join(tdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if files and save:
    import shutil
    shutil.copyfile(files[0], save)
  return files[0] if files else None


def trace_kernels(run, tdir: str | None = None, *, host: bool = False,
                  save: str | None = None) -> list[tuple[str, float, float]] | None:
  """Runs `run()` under the JAX profiler and returns its GPU kernel events (name, start us, duration us),
  memcpy / memset left out; None where the trace has no GPU stream (CPU). host: also trace the host
  (XLA runtime TraceMe events at level 2 and Python calls); save: copy the Perfetto JSON (.json.gz) there."""
  tdir = tdir or tempfile.mkdtemp(prefix="ftjax_trace_")
  with jax.profiler.trace(tdir, create_perfetto_trace=True, profiler_options=host_profile_options() if host else None):
    run()
  path = perfetto_file(tdir, save)
  if path is None:
    return None
  events, pname, tname = perfetto_events(path)
  out = [(e["name"], e["ts"], e.get("dur", 0.0)) for e in events
         if e.get("ph") == "X" and "GPU" in pname.get(e.get("pid"), "")
         and "Stream" in tname.get((e.get("pid"), e.get("tid")), "")
         and "memcpy" not in e.get("name", "").lower() and "memset" not in e.get("name", "").lower()]
  return out or None


def kernel_time_call(fn, arg_sets, *, reps: int = 5):
  """Like time_call, but the time of one call is the GPU kernels' busy time (from a profiler trace)
  divided by the calls, so the host's per-program cost (dispatch, argument handling) is left out.
  Returns (seconds, outputs); (None, outputs) where no GPU kernels are traced (CPU)."""
  multi = jax.jit(lambda sets: [fn(*a) for a in sets])
  out = block(multi(arg_sets))
  block(multi(arg_sets))
  ev = trace_kernels(lambda: [block(multi(arg_sets)) for _ in range(reps)])
  if not ev:
    return None, out
  return sum(d for _, _, d in ev) / 1e6 / (reps * len(arg_sets)), out
