"""Small-M linear benchmark: the Pallas `small_linear` kernel beside XLA's own dot (GPU).

  PYTHONUNBUFFERED=1 python bench/small_linear.py --json $OUT/small_linear.json \
      [--parts check,copy,main,sweep] [--models gpt350m,gpt1.3b,llama3-8b] [--ms 1,2,8,16] \
      [--dtypes bf16,int8] [--sweep-budget 240]
  python bench/small_linear.py --smoke          # CPU: tiny shapes, interpret mode, seconds

Shapes: the decode projections of GPT 350M (d=1024), GPT 1.3B (d=2048) and LLaMA-3-8B, each
group being the weights one kernel launch reads (q/k/v: three weights; gate/up: two):
x [M, K] bf16 for M in 1, 2, 8, 16; weights bf16, or int8 with a per-output-channel scale.
XLA baseline: `ftjax.layers.linear.linear` per weight, the model's own path (bf16:
dot_general(x, W); int8: dot_general(x, q.astype(bf16)) * scale behind an optimization barrier).
Both return float32 [M, N_i] per weight (--epilogue bias_bf16: both then add a bias and cast to
bf16, the model's next step, with which the kernel's split-K reduction and scale fuse).

Parts:
  check  ragged / odd shapes (N and K off the blocks, M = 1, 5, 16, several configs, all weight
         dtypes) against the float32 reference, on memory poisoned with NaN first (a load that
         escapes its mask, or an output element never written, shows up as NaN / error);
  copy   device copy bandwidth (bench/common.py), the yardstick for GB/s;
  main   every shape x M x dtype: the kernel with the auto config, XLA, max error vs the reference;
  sweep  a coordinate search (block_n, then block_k, then num_splits, then num_warps x
         num_stages) on a few representative shapes, stopped after --sweep-budget seconds.
Timing: `bench/common.py`'s time_call: one jitted program runs the op `calls` times, each call
with its own x, the weights rotating over enough copies to exceed 3x the 50 MB L2 (n_rotations),
~2 ms of device work per program, median of --reps repeats. GB/s = weight bytes / time.
Rows go to --json (rewritten after every row, so a cut run keeps what it measured) and a
markdown table is printed at the end.

Caveat (H100, 2026-11-25): with `--timing wall` (then the only timing) the per-call times were 5-6x
the same projections' kernel times in the decode loop's profile (GPT-350M q/k/v: ~28 us here, 5.5 us
in the model), for the kernel and for XLA alike: the timed program's fixed host cost dominated. The
default is now `--timing trace` (kernel busy time from a profiler trace, per call), not yet run on
the GPU; `bench/step_ab.py --small-m off,on` measures the decode step itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from bench.common import (calls_per_program, copy_bandwidth, device_info, kernel_time_call, n_rotations,
                          time_call)
from ftjax.layers.linear import QuantizedWeight, QuantizedWeightT, linear
from ftjax.pallas import _common as C
from ftjax.pallas.small_linear import (SmallLinearConfig, choose_config, small_linear,
                                       small_linear_reference)

BF16 = jnp.bfloat16
DTYPES = {"bf16": BF16, "int8": jnp.int8, "int8t": jnp.int8}   # int8t: stored [N, K], as the engine's

# (op, K, (N_i of the weights one launch reads))
MODELS = {
    "gpt350m": [("qkv", 1024, (1024, 1024, 1024)), ("o", 1024, (1024,)),
                ("fc1", 1024, (4096,)), ("fc2", 4096, (1024,))],
    "gpt1.3b": [("qkv", 2048, (2048, 2048, 2048)), ("o", 2048, (2048,)),
                ("fc1", 2048, (8192,)), ("fc2", 8192, (2048,))],
    "llama3-8b": [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)),
                  ("gate_up", 4096, (14336, 14336)), ("down", 14336, (4096,))],
}
SMOKE_MODELS = {"smoke": [("qkv", 256, (256, 64, 64)), ("o", 256, (256,)), ("down", 512, (128,))]}

# (model, op, M, dtype) searched by the sweep, most important first.
SWEEP = [("llama3-8b", "qkv", 1, "bf16"), ("llama3-8b", "qkv", 16, "bf16"),
         ("llama3-8b", "down", 1, "int8"), ("llama3-8b", "o", 8, "bf16"),
         ("llama3-8b", "qkv", 1, "int8"), ("gpt1.3b", "fc2", 16, "bf16"),
         ("gpt350m", "qkv", 1, "bf16"), ("llama3-8b", "gate_up", 2, "int8"),
         ("gpt1.3b", "qkv", 8, "int8")]
SMOKE_SWEEP = [("smoke", "qkv", 1, "bf16"), ("smoke", "down", 16, "int8")]

ROWS = []
ARGS = None


def emit(row):
  ROWS.append(row)
  print(json.dumps(row), flush=True)
  if ARGS.json:
    with open(ARGS.json, "w") as f:
      json.dump(ROWS, f, indent=1)


def cfg_str(c: SmallLinearConfig) -> str:
  return f"bn{c.block_n} bk{c.block_k} s{c.num_splits} w{c.num_warps} st{c.num_stages}"


def poison(nbytes: int):
  """NaN-fill then free device memory, so buffers allocated next sit in / beside NaN."""
  x = jnp.full((max(1, nbytes // 4),), jnp.nan, jnp.float32)
  x.block_until_ready()
  x.delete()


def make_weights(key, K, Ns, dtype, copies, trans=False):
  """`copies` independent weight sets: list of (ws, scales); trans: int8 stored [N, K]."""
  sets = []
  for _ in range(copies):
    ws, scales = [], []
    for n in Ns:
      key, kw, ks = jax.random.split(key, 3)
      if jnp.dtype(dtype) == jnp.int8:
        ws.append(jax.random.randint(kw, (n, K) if trans else (K, n), -127, 128, jnp.int32).astype(jnp.int8))
        scales.append(jax.random.uniform(ks, (n,), jnp.float32, 0.5, 1.5) / (127.0 * math.sqrt(K)))
      else:
        ws.append((jax.random.normal(kw, (K, n), jnp.float32) / math.sqrt(K)).astype(dtype))
        scales.append(None)
    sets.append((ws, scales))
  return sets


def with_epilogue(outs, biases):
  """--epilogue bias_bf16: what a model does next (bias add, cast to the activation dtype)."""
  if biases is None:
    return outs
  return [(o + b.astype(jnp.float32)).astype(BF16) for o, b in zip(outs, biases)]


def kernel_fn(config, interpret, trans=False):
  def f(x, ws, scales, biases):
    return with_epilogue(small_linear(x, ws, scales, config=config, interpret=interpret,
                                      transposed=[trans] * len(ws)), biases)
  return f


def xla_fn_for(trans=False):
  def xla_fn(x, ws, scales, biases):
    outs = [linear(x, w if s is None else (QuantizedWeightT if trans else QuantizedWeight)(w, s))
            for w, s in zip(ws, scales)]
    return with_epilogue(outs, biases)
  return xla_fn


def max_err(out, x, ws, scales, trans=False):
  """(max abs error, max abs error / max |ref|) of a list of outputs against the reference."""
  ref = small_linear_reference(x, ws, scales, transposed=[trans] * len(ws))
  errs = [float(jnp.max(jnp.abs(o.astype(jnp.float32) - r))) for o, r in zip(out, ref)]
  mags = [float(jnp.max(jnp.abs(r))) for r in ref]
  return max(errs), max(e / max(m, 1e-30) for e, m in zip(errs, mags))


class Shape:
  """One (model, op, dtype): weight copies on the device, and the x sets per M."""

  def __init__(self, model, op, K, Ns, dtype_name, seed):
    self.model, self.op, self.K, self.Ns, self.dtype_name = model, op, K, tuple(Ns), dtype_name
    self.dtype = DTYPES[dtype_name]
    self.trans = dtype_name == "int8t"
    self.w_bytes = K * sum(Ns) * jnp.dtype(self.dtype).itemsize
    self.rot = n_rotations(self.w_bytes, cap=ARGS.max_rot)
    self.calls = calls_per_program(self.w_bytes / 3.0e12, self.rot, cap=ARGS.max_calls)
    self.sets = make_weights(jax.random.key(seed), K, Ns, self.dtype, self.rot, self.trans)
    self.biases = None
    if ARGS.epilogue == "bias_bf16":
      self.biases = [jax.random.normal(jax.random.key(seed + i), (n,), BF16)
                     for i, n in enumerate(Ns)]
    self.seed = seed

  def config(self, M, cfg=None):
    """The resolved config of this shape's kernel (choose_config, in the weights' layout)."""
    return choose_config(M, self.K, self.Ns, self.dtype, cfg, kmajor=self.trans)

  def arg_sets(self, M):
    xs = jax.random.normal(jax.random.key(self.seed + M), (self.calls, M, self.K), BF16)
    return [(xs[j], *self.sets[j % self.rot], self.biases) for j in range(self.calls)]

  def key(self, M):
    return dict(model=self.model, op=self.op, K=self.K, Ns=list(self.Ns), dtype=self.dtype_name,
                M=M, MB=round(self.w_bytes / 1e6, 2), epilogue=ARGS.epilogue)

  def time(self, fn, arg_sets):
    if ARGS.timing == "trace":   # kernel busy time from a profiler trace (wall time where none: CPU)
      t, _ = kernel_time_call(fn, arg_sets, reps=min(ARGS.reps, 5))
      if t is not None:
        return t
    t, _ = time_call(fn, arg_sets, reps=ARGS.reps)
    return t


def time_kernel(shape: Shape, M, arg_sets, config, tag):
  resolved = shape.config(M, config)
  row = dict(kind=tag, impl="pallas", **shape.key(M), config=cfg_str(resolved))
  try:
    t = shape.time(kernel_fn(config, ARGS.interpret, shape.trans), arg_sets)
    x0, ws0, sc0, _ = arg_sets[0]
    out = kernel_fn(config, ARGS.interpret, shape.trans)(x0, ws0, sc0, None)
    err, rel = max_err(out, x0, ws0, sc0, shape.trans)
    row.update(us=round(t * 1e6, 2), GBps=round(shape.w_bytes / t / 1e9, 1),
               max_abs_err=float(f"{err:.3e}"), rel_err=float(f"{rel:.3e}"),
               ok=bool(rel < 1e-3), rot=shape.rot, calls=shape.calls)
  except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded
    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    t = float("inf")
  emit(row)
  return t, resolved


def time_xla(shape: Shape, M, arg_sets):
  row = dict(kind="main", impl="xla", **shape.key(M))
  try:
    t = shape.time(xla_fn_for(shape.trans), arg_sets)
    row.update(us=round(t * 1e6, 2), GBps=round(shape.w_bytes / t / 1e9, 1), rot=shape.rot,
               calls=shape.calls)
  except Exception as e:  # noqa: BLE001
    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    t = float("inf")
  emit(row)
  return t


# -------------------------------------------------------------------------------------- parts
def part_check():
  """Odd shapes and explicit configs against the reference on NaN-poisoned memory."""
  S = SmallLinearConfig
  cases = [
      (1, 1000, (100, 36, 200), ("bf16", "bf16", "bf16"), None),
      (5, 1000, (100, 36, 200), ("int8", "int8", "int8"), S(block_n=64, block_k=64, num_splits=3)),
      (16, 777, (300,), ("bf16",), S(block_n=128, block_k=32, num_splits=7)),
      (2, 4100, (1030,), ("int8",), None),
      (3, 96, (24,), ("f32",), S(block_n=16, block_k=64)),
      (16, 4096, (4096, 1024, 1024), ("bf16",) * 3, S(block_n=256, block_k=64, num_splits=4)),
      (1, 1024, (1024,), ("f16",), S(block_n=32, block_k=128, num_splits=8, num_warps=8)),
      (8, 2053, (333, 17), ("bf16", "int8"), S(block_n=32, block_k=256, num_stages=4)),
  ]
  if ARGS.smoke:   # interpreted on CPU: only the small cases
    cases = [c for c in cases if c[1] * sum(c[2]) <= 300_000]
  dt = {"bf16": BF16, "int8": jnp.int8, "f32": jnp.float32, "f16": jnp.float16}
  n_fail = 0
  for i, (M, K, Ns, dts, cfg) in enumerate(cases):
    name = f"M={M} K={K} Ns={Ns} {dts} {cfg_str(choose_config(M, K, Ns, BF16, cfg))}"
    try:
      key = jax.random.key(100 + i)
      poison(ARGS.poison_mb * 2**20)
      xdt = jnp.float32 if "f32" in dts else (jnp.float16 if "f16" in dts else BF16)
      ws, scales = [], []
      for j, (n, d) in enumerate(zip(Ns, dts)):
        kw, ks = jax.random.split(jax.random.fold_in(key, j))
        if d == "int8":
          ws.append(jax.random.randint(kw, (K, n), -127, 128, jnp.int32).astype(jnp.int8))
          scales.append(jax.random.uniform(ks, (n,), jnp.float32, 0.5, 1.5))
        else:
          ws.append(jax.random.normal(kw, (K, n), dt[d]))
          scales.append(None)
      x = jax.random.normal(jax.random.fold_in(key, 99), (M, K), xdt)
      poison(ARGS.poison_mb * 2**20)
      out = small_linear(x, ws, scales, config=cfg, interpret=ARGS.interpret)
      ref = small_linear_reference(x, ws, scales)
      xa = jnp.abs(x.astype(jnp.float32))
      worst = 0.0
      finite = True
      for o, r, w, s in zip(out, ref, ws, scales):
        mag = jnp.dot(xa, jnp.abs(w.astype(xdt).astype(jnp.float32)),
                      precision=jax.lax.Precision.HIGHEST)
        if s is not None:
          mag = mag * jnp.abs(s)
        finite &= bool(jnp.isfinite(o).all())
        worst = max(worst, float(jnp.max(jnp.abs(o - r) / jnp.maximum(mag, 1e-30))))
      ok = finite and worst < 1e-4
      emit(dict(kind="check", case=name, ok=ok, finite=finite, err_over_magnitude=float(f"{worst:.3e}")))
    except Exception as e:  # noqa: BLE001
      ok = False
      emit(dict(kind="check", case=name, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}"))
    n_fail += not ok
  print(f"# check: {len(cases) - n_fail} passed, {n_fail} failed", flush=True)


def shapes_of(models):
  for mi, model in enumerate(models):
    for oi, (op, K, Ns) in enumerate(ARGS.model_table[model]):
      for dname in ARGS.dtypes:
        yield model, op, K, Ns, dname, 1000 * mi + 10 * oi


def part_main():
  for model, op, K, Ns, dname, seed in shapes_of(ARGS.models):
    shape = Shape(model, op, K, Ns, dname, seed)
    for M in ARGS.ms:
      sets = shape.arg_sets(M)
      time_kernel(shape, M, sets, None, "main")
      time_xla(shape, M, sets)
      del sets
    del shape


def sweep_one(shape: Shape, M, deadline):
  """Coordinate search from the auto config; returns nothing (rows are emitted)."""
  sets = shape.arg_sets(M)
  tried = {}

  def run(cfg):
    res = shape.config(M, cfg)
    key = (res.block_n, res.block_k, res.num_splits, res.num_warps, res.num_stages)
    if key not in tried:
      if time.time() > deadline:
        return float("inf")
      tried[key] = time_kernel(shape, M, sets, cfg, "sweep")[0]
    return tried[key]

  best = shape.config(M)
  best_t = run(best)
  stages = [
      [dataclasses.replace(best, block_n=bn, block_k=None, num_splits=None)
       for bn in (16, 32, 64, 128, 256)],
      lambda b: [dataclasses.replace(b, block_k=bk, num_splits=None) for bk in (32, 64, 128, 256)],
      lambda b: [dataclasses.replace(b, num_splits=s) for s in (1, 2, 4, 8, 16, 32)],
      lambda b: [dataclasses.replace(b, num_warps=w, num_stages=st)
                 for w, st in ((2, 3), (4, 2), (4, 4), (4, 5), (8, 3), (8, 4))],
  ]
  for stage in stages:
    cands = stage if isinstance(stage, list) else stage(best)
    for cfg in cands:
      t = run(cfg)
      if t < best_t:
        best_t, best = t, shape.config(M, cfg)
  emit(dict(kind="sweep_best", **shape.key(M), config=cfg_str(best),
            us=round(best_t * 1e6, 2), GBps=round(shape.w_bytes / best_t / 1e9, 1),
            tried=len(tried)))


def part_sweep():
  deadline = time.time() + ARGS.sweep_budget
  table = {m: dict((op, (K, Ns)) for op, K, Ns in ops) for m, ops in ARGS.model_table.items()}
  for model, op, M, dname in ARGS.sweep:
    if time.time() > deadline:
      print("# sweep budget spent", flush=True)
      break
    if model not in table or dname not in ARGS.dtypes:
      continue
    K, Ns = table[model][op]
    shape = Shape(model, op, K, Ns, dname, 7)
    sweep_one(shape, M, deadline)
    del shape


# ------------------------------------------------------------------------------------ summary
def summary(copy_bw):
  print(f"\n=== small_linear summary (epilogue: {ARGS.epilogue or 'none, float32 out'}) ===")
  print(device_info(), f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)"
        if copy_bw == copy_bw else "")
  main = {}
  for r in ROWS:
    if r["kind"] in ("main", "sweep", "sweep_best") and "us" in r:
      k = (r["model"], r["op"], r["dtype"], r["M"])
      d = main.setdefault(k, {"MB": r["MB"], "K": r["K"], "Ns": r["Ns"]})
      if r["kind"] == "main":
        d[r["impl"]] = r
      if r["kind"] in ("main", "sweep") and r.get("impl") == "pallas":
        if "best" not in d or r["us"] < d["best"]["us"]:
          d["best"] = r
        if not r.get("ok", True):
          d["bad"] = True
  print("| model | op | K | N | dtype | M | W MB | auto µs | auto GB/s | best µs | best GB/s "
        "| best config | XLA µs | XLA GB/s | XLA / best | max err ok |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for (model, op, dtype, M), d in main.items():
    a, b, x = d.get("pallas"), d.get("best"), d.get("xla")
    def f(r, key):
      return f"{r[key]}" if r and key in r else "n/a"
    ratio = f"{x['us'] / b['us']:.2f}" if (x and b) else "n/a"
    print(f"| {model} | {op} | {d['K']} | {'+'.join(map(str, d['Ns']))} | {dtype} | {M} | "
          f"{d['MB']} | {f(a, 'us')} | {f(a, 'GBps')} | {f(b, 'us')} | {f(b, 'GBps')} | "
          f"{f(b, 'config')} | {f(x, 'us')} | {f(x, 'GBps')} | {ratio} | "
          f"{'NO' if d.get('bad') else 'yes'} |")
  checks = [r for r in ROWS if r["kind"] == "check"]
  if checks:
    bad = [r for r in checks if not r["ok"]]
    print(f"check: {len(checks) - len(bad)} passed, {len(bad)} failed")
    for r in bad:
      print("  FAIL", r)
  errs = [r for r in ROWS if "error" in r]
  for r in errs:
    print("  ERROR", r.get("kind"), r.get("model"), r.get("op"), r.get("M"), r.get("config"),
          r["error"][:200])


def main():
  global ARGS
  ap = argparse.ArgumentParser()
  ap.add_argument("--json", default=None, help="write all rows here (JSON list)")
  ap.add_argument("--parts", default="check,copy,main,sweep")
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--ms", default="1,2,8,16")
  ap.add_argument("--dtypes", default="bf16,int8")
  ap.add_argument("--sweep", default=None, help="the sweep's cases instead of the built-in list: "
                  "model:op:M:dtype,... (e.g. gpt1.3b:fc1:64:int8)")
  ap.add_argument("--sweep-budget", type=float, default=240.0, help="seconds for the sweep part")
  ap.add_argument("--timing", choices=("trace", "wall"), default="trace",
                  help="trace: a call's time is its GPU kernels' busy time from a profiler trace (the host's "
                       "per-program cost left out); wall: time_call's synchronised wall time per call")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--max-calls", type=int, default=64)
  ap.add_argument("--max-rot", type=int, default=32)
  ap.add_argument("--poison-mb", type=int, default=512)
  ap.add_argument("--epilogue", choices=("none", "bias_bf16"), default="none",
                  help="bias_bf16: both impls add a bias and cast to bf16 after the matmul "
                       "(the kernel's split-K reduction then fuses with it, as in a model)")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes; interpreted on CPU")
  ARGS = ap.parse_args()
  ARGS.interpret = C.default_interpret()
  if ARGS.epilogue == "none":
    ARGS.epilogue = None
  ARGS.model_table = MODELS
  ARGS.sweep = [(m, op, int(M), d) for m, op, M, d in (c.split(":") for c in ARGS.sweep.split(","))] \
      if ARGS.sweep else SWEEP
  if ARGS.smoke:
    ARGS.model_table = SMOKE_MODELS
    ARGS.sweep = SMOKE_SWEEP
    ARGS.models = "smoke"
    ARGS.ms = "1,16"
    ARGS.reps, ARGS.max_calls, ARGS.max_rot, ARGS.poison_mb = 1, 2, 2, 1
    ARGS.sweep_budget = min(ARGS.sweep_budget, 20.0)
  ARGS.models = [m for m in ARGS.models.split(",") if m]
  for m in ARGS.models:
    assert m in ARGS.model_table, f"--models: unknown model {m!r}; known: {list(ARGS.model_table)}"
  ARGS.ms = [int(m) for m in ARGS.ms.split(",")]
  ARGS.dtypes = [d for d in ARGS.dtypes.split(",") if d]
  for d in ARGS.dtypes:
    assert d in DTYPES, f"--dtypes: unknown dtype {d!r}; known: {list(DTYPES)}"
  parts = ARGS.parts.split(",")
  print(device_info(), time.strftime("%Y-%m-%d %H:%M:%S"), "interpret" if ARGS.interpret else "",
        flush=True)
  t0 = time.time()
  copy_bw = float("nan")
  for part in ("check", "copy", "main", "sweep"):
    if part not in parts:
      continue
    t1 = time.time()
    try:
      if part == "check":
        part_check()
      elif part == "copy":
        if ARGS.smoke:
          continue
        cb = copy_bandwidth()
        copy_bw = max(cb.values())
        emit(dict(kind="copy", **{k: round(v / 1e9, 1) for k, v in cb.items()}))
      elif part == "main":
        part_main()
      else:
        part_sweep()
    except Exception:  # noqa: BLE001 - keep the other parts
      traceback.print_exc()
    print(f"# part {part} took {time.time() - t1:.0f}s", flush=True)
  summary(copy_bw)
  print(f"# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
