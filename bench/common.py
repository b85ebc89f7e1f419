"""Timing helpers for the GPU benchmarks (device-synchronised, warmed up, median of repeats).

`time_call(fn, arg_sets)`: one jitted program runs `fn` once on each of the `arg_sets`
(distinct input buffers, so repeated calls do not hit in L2 when the inputs are small), the
host blocks on the result, and the median over repeats of (wall time / len(arg_sets)) is the
time of one call. Launch overhead is amortised over the calls of one program.
"""
from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp

L2_BYTES = 50 * 2**20   # H100: 50 MB of L2


def n_rotations(bytes_per_set: int, cap: int = 32) -> int:
  """Input sets needed so the sets together are >= 3x the L2 (at least 1, at most cap)."""
  return max(1, min(cap, math.ceil(3 * L2_BYTES / max(1, bytes_per_set))))


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


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  f = lambda a: a + jnp.bfloat16(1)
  t, _ = time_call(f, [(x,)], reps=20)
  return 2 * nbytes / t


def device_info() -> str:
  d = jax.devices()[0]
  return f"{d.device_kind} ({d.platform}), jax {jax.__version__}"
