"""How close can a decode step built of one kernel per projection come to its weight bytes over copy bandwidth?

  PYTHONUNBUFFERED=1 python bench/stream_bound.py --models 1.3b,350m --dtypes bf16,int8 --json $OUT/stream.jsonl
  python bench/stream_bound.py --smoke        # CPU: tiny buffers, interpreted kernels, seconds

Issue 9 asks for a batch-1 decode step within 1.3x of its weight bytes over copy bandwidth. ftjax's step
streams each layer's weights through four projection kernels (q/k/v in one launch, o, MLP in, MLP out), and
the twelfth session's profile (bench/RESULTS.md) found them 1.13-1.59x their bytes over copy bandwidth each.
This sets a yardstick beside them: a Pallas read kernel that only streams a buffer (each program walks its run
of [rows, 128] tiles, keeping an elementwise max in the buffer's own dtype) and writes one value a program, in
three arrangements of the same bytes a layer (int8 buffers: the chain also with each tile converted to bf16 as
the projection kernel converts it, --dequant; "int8b": the int8 byte sizes read as bf16, the stream without any
byte-wise work):

  chain   four kernels a layer, the projections' byte sizes in their order; each waits for the previous one
          (it reads the previous kernel's output after its grid-dependency wait, as the model's kernels do,
          with programmatic dependent launch where the device has it: --pdl on/off/both)
  layer   one kernel a layer over one buffer of the layer's bytes (what a single kernel per layer could do)
  whole   one kernel over 8 layers' bytes (the streaming rate without kernel boundaries)

With --proj 1 (default) the model's own projection kernel (`small_linear_parts`, M = 1, its auto config and PDL
rule; int8 stored [N, K] as the engine stores it) runs over the same bytes in the same three arrangements:
proj_chain = the four projections of each layer (q/k/v in one call), proj_layer = one call a layer with one
[d, 4d + 2f] weight, proj_whole = one call with a [d, 8 (4d + 2f)] weight: whether fewer, longer projection
kernels would stream faster.

Each program runs `passes` x the model's layers of its arrangement back to back (the layers' buffers
together exceed the 50 MB L2 many times over), timed as wall clock per program, median of --reps, less an
empty program's time; per layer = that / (passes x layers). A short sweep over tile bytes, programs and warps
picks each arrangement's best config (--sweep). "boundary" = (chain - layer) / 3: what each extra kernel
boundary in a layer cost the read kernel.

It is a yardstick, not a lower bound: on an H100 (bench/RESULTS.md, twenty-eighth session) the model's own
projections streamed a 1.3B layer faster than this chain of four read kernels (41.2 against 46.4 us) and about as
fast as one read kernel over the whole layer (40.0); the int8 max alone is slower than converting to bf16 first.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C
from ftjax.pallas.small_linear import dequant_int8, resolve_dequant

COLS = 128                                                 # tile columns (elements)
# (layers, [q/k/v, o, MLP in, MLP out] weight elements)
MODELS = {
    "350m": (24, [1024 * 3072, 1024 * 1024, 1024 * 4096, 4096 * 1024]),
    "1.3b": (24, [2048 * 6144, 2048 * 2048, 2048 * 8192, 8192 * 2048]),
    "6.7b": (32, [4096 * 12288, 4096 * 4096, 4096 * 16384, 16384 * 4096]),
    "smoke": (2, [64 * 192, 64 * 64, 64 * 256, 256 * 64]),
}
# "int8b": the int8 weights' byte sizes read as bf16 (half the elements): the memory stream alone, without the
# int8 tile's byte-wise work (an int8 max is not free: the plain int8 chain measured slower than the converted one)
# (hidden d, MLP width f) of the same models: the projections' shapes for the proj_* arrangements
DIMS = {"350m": (1024, 4096), "1.3b": (2048, 8192), "6.7b": (4096, 16384), "smoke": (64, 256)}
DTYPES = {"bf16": jnp.bfloat16, "int8": jnp.int8, "int8b": jnp.bfloat16}


def _read_kernel(dep_ref, w_ref, o_ref, *, bm: int, per_prog: int, ntiles: int, pdl: bool, dequant: str | None):
  """dep_ref [P0, 16] f32 (the previous kernel's output: read after the wait), w_ref [rows, COLS],
  o_ref [P, 16] f32 (this program's row: the max of its tiles plus the dependency's value)."""
  pid = pl.program_id(0)
  z = C.grid_dependency(pdl)
  d = jnp.max(dep_ref[pl.ds(z, 1), :])
  lo = pid * per_prog
  hi = jnp.minimum(lo + per_prog, ntiles)

  adt = jnp.bfloat16 if dequant else w_ref.dtype

  def body(t, acc):
    w = w_ref[pl.ds(t * bm, bm), :]
    if dequant:                                  # int8 -> bf16 as the projection kernel converts its tiles
      w = dequant_int8(w, jnp.bfloat16, dequant)
    return jnp.maximum(acc, w)

  acc = jax.lax.fori_loop(lo, hi, body, jnp.full((bm, COLS), jnp.iinfo(jnp.int8).min if adt == jnp.int8
                                                 else -jnp.inf, adt))
  o_ref[pl.ds(pid, 1), :] = jnp.full((1, 16), jnp.max(acc).astype(jnp.float32) + d, jnp.float32)


def read(dep, w, *, tile_bytes: int, programs: int, warps: int, stages: int, pdl: bool, interpret: bool,
         dequant: str | None = None):
  """One read kernel over w [rows, COLS]; dep [P0, 16] f32 -> [P, 16] f32."""
  rows = w.shape[0]
  bm = max(16, min(rows, tile_bytes // (COLS * w.dtype.itemsize)))
  assert rows % bm == 0, (rows, bm)
  ntiles = rows // bm
  per_prog = -(-ntiles // min(programs, ntiles))
  P = -(-ntiles // per_prog)
  whole = lambda shape: pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))  # noqa: E731
  return pl.pallas_call(
      functools.partial(_read_kernel, bm=bm, per_prog=per_prog, ntiles=ntiles, pdl=pdl,
                        dequant=None if dequant is None else resolve_dequant(dequant, interpret)),
      grid=(P,),
      in_specs=[whole(dep.shape), whole(w.shape)],
      out_specs=whole((P, 16)),
      out_shape=jax.ShapeDtypeStruct((P, 16), jnp.float32),
      compiler_params=None if interpret else C.triton_compiler_params(warps, stages),
      interpret=interpret,
      name="ftjax_stream_read",
  )(dep, w)


def buffers(model: str, dtype, arrangement: str, key, halve: bool = False):
  """The arrangement's buffers, one list per layer: chain [qkv, o, fc1, fc2]; layer [all four in one]; whole
  [8 layers in one] (one entry). halve: half the elements (int8 byte sizes in bf16)."""
  layers, sizes = MODELS[model]
  if halve:
    sizes = [n // 2 for n in sizes]
  if arrangement == "chain":
    shapes = [[n // COLS for n in sizes] for _ in range(layers)]
  elif arrangement == "layer":
    shapes = [[sum(sizes) // COLS] for _ in range(layers)]
  else:
    shapes = [[8 * sum(sizes) // COLS]]
  out = []
  for i, rows in enumerate(shapes):
    layer = []
    for j, r in enumerate(rows):
      k = jax.random.fold_in(key, 1000 * i + j)
      if dtype == jnp.int8:
        layer.append(jax.random.randint(k, (r, COLS), -127, 127, jnp.int8))
      else:
        layer.append(jax.random.normal(k, (r, COLS), dtype))
    out.append(layer)
  return out


def program(bufs, passes: int, **kw):
  """The read kernel over every buffer in order, `passes` times, each call waiting on the one before."""
  def run(bufs):
    dep = jnp.zeros((1, 16), jnp.float32)
    for _ in range(passes):
      for layer in bufs:
        for w in layer:
          dep = read(dep, w, **kw)
    return dep
  return jax.jit(run)


def proj_weights(model: str, dtype, arrangement: str, key):
  """The model's own projection kernel's weights, one list of calls per layer, each call a tuple of weights sharing
  K: chain [(q, k, v), (o,), (MLP in,), (MLP out,)]; layer [(one [d, 4d + 2f] weight,)]; whole [(one [d, 8 (4d +
  2f)],)] (one entry). bf16 stored [K, N]; int8 stored [N, K] (as the engine stores them)."""
  layers, _ = MODELS[model]
  d, f = DIMS[model]
  if arrangement == "chain":
    calls = [[(d, (d, d, d)), (d, (d,)), (d, (f,)), (f, (d,))] for _ in range(layers)]
  elif arrangement == "layer":
    calls = [[(d, (4 * d + 2 * f,))] for _ in range(layers)]
  else:
    calls = [[(d, (8 * (4 * d + 2 * f),))]]
  out = []
  for i, layer in enumerate(calls):
    lw = []
    for j, (K, Ns) in enumerate(layer):
      ws = []
      for m, N in enumerate(Ns):
        k = jax.random.fold_in(key, 10000 * i + 100 * j + m)
        if dtype == jnp.int8:
          ws.append(jax.random.randint(k, (N, K), -127, 127, jnp.int8))
        else:
          ws.append(jax.random.normal(k, (K, N), dtype) * 0.02)
      lw.append(tuple(ws))
    out.append(lw)
  return out


def proj_program(passes: int, trans: bool, interpret: bool):
  """Every call of the weight lists through `small_linear_parts` (M = 1, the model's auto config and PDL), in
  order, `passes` times; x [1, K] bf16 per K."""
  from ftjax.pallas.small_linear import small_linear_parts

  def run(wsets, xs):
    outs = []
    for _ in range(passes):
      for layer in wsets:
        for ws in layer:
          K = ws[0].shape[1] if trans else ws[0].shape[0]
          outs += small_linear_parts(xs[str(K)], list(ws), interpret=interpret,
                                     transposed=[trans] * len(ws) if trans else None)
    return outs
  return jax.jit(run)


def wall(f, args, reps: int) -> float:
  jax.block_until_ready(f(args))
  jax.block_until_ready(f(args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="1.3b,350m")
  ap.add_argument("--dtypes", default="bf16,int8,int8b")
  ap.add_argument("--pdl", default="on", choices=("on", "off", "both"))
  ap.add_argument("--passes", type=int, default=3)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--sweep", default="16384:528:4,32768:264:4,32768:264:8",
                  help="tile_bytes:programs:warps configs tried for each arrangement (best kept)")
  ap.add_argument("--stages", type=int, default=3)
  ap.add_argument("--dequant", default="cvt,asm", help="int8 rows: the chain again with its tiles converted to bf16 "
                  "each of these ways (small_linear's dequant_int8), as the projection kernel does; '' for none")
  ap.add_argument("--proj", type=int, default=1, help="1: also the model's projection kernel (small_linear_parts, "
                  "M = 1, auto config) over the same bytes as whole / layer / chain (bf16 and int8; in the first --pdl value's row, the kernel with its own PDL rule)")
  ap.add_argument("--json", default=None)
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  interpret = args.smoke or jax.devices()[0].platform != "gpu"
  models = ["smoke"] if args.smoke else args.models.split(",")
  reps = 2 if args.smoke else args.reps
  passes = 1 if args.smoke else args.passes
  sweep = [tuple(int(v) for v in s.split(":")) for s in args.sweep.split(",")]
  if args.smoke:
    sweep = [(1024, 4, 4)]
  pdls = {"on": [True], "off": [False], "both": [True, False]}[args.pdl]
  if interpret:
    pdls = [False]
  elif True in pdls and not C.pdl_on(False):
    print("note: this device has no programmatic dependent launch; --pdl on runs without it", flush=True)

  from bench.common import copy_bandwidth, device_info
  bw = max(copy_bandwidth(2**20 if args.smoke else 2 * 2**30).values())
  env = {"part": "env", "device": device_info(), "copy_GBps": round(bw / 1e9, 1)}
  print(json.dumps(env), flush=True)
  key = jax.random.key(0)
  for model in models:
    layers, sizes = MODELS[model]
    for dname in args.dtypes.split(","):
      dtype = DTYPES[dname]
      halve = dname == "int8b"
      layer_bytes = sum(sizes) * (1 if halve else jnp.dtype(dtype).itemsize)
      for pdl in pdls:
        res = {}
        arrs = [("whole", None), ("layer", None), ("chain", None)]
        if dtype == jnp.int8:
          arrs += [("chain", d) for d in args.dequant.split(",") if d]
        for arr, deq in arrs:
          bufs = buffers(model, dtype, arr, key, halve)
          n_layers = 8 if arr == "whole" else layers
          best = None
          for tb, progs, warps in sweep:
            kw = dict(tile_bytes=tb, programs=progs, warps=warps, stages=args.stages, pdl=pdl, interpret=interpret,
                      dequant=deq)
            t = wall(program(bufs, passes, **kw), bufs, reps)
            tiny = [[jnp.zeros((16, COLS), dtype)]]
            t0 = wall(program(tiny, 1, **kw), tiny, reps)
            per_layer = (t - t0) / (passes * n_layers)
            if best is None or per_layer < best[0]:
              best = (per_layer, f"{tb}:{progs}:{warps}")
          res[arr if deq is None else f"{arr}_{deq}"] = best
          del bufs
        floor_us = layer_bytes / bw * 1e6
        row = {"part": "stream", "model": model, "dtype": dname, "pdl": pdl, "layer_MB": round(layer_bytes / 1e6, 2),
               "floor_us": round(floor_us, 2)}
        for arr, (t, cfg) in res.items():
          row[f"{arr}_us"] = round(t * 1e6, 2)
          row[f"{arr}_x"] = round(t * 1e6 / floor_us, 3)
          row[f"{arr}_cfg"] = cfg
        row["boundary_us"] = round((res["chain"][0] - res["layer"][0]) / 3 * 1e6, 2)
        if args.proj and dname in ("bf16", "int8") and pdl == pdls[0]:   # the kernel keeps its own PDL rule
          trans = dtype == jnp.int8
          d, f = DIMS[model]
          xs = {str(K): jax.random.normal(jax.random.fold_in(key, K), (1, K), jnp.bfloat16) for K in (d, f)}
          tiny_w = [[(jnp.zeros((16, 16), dtype),)]]
          tiny_x = {"16": jnp.zeros((1, 16), jnp.bfloat16)}
          f0 = proj_program(1, trans, interpret)
          t0 = wall(lambda a: f0(*a), (tiny_w, tiny_x), reps)
          for arr in ("whole", "layer", "chain"):
            wsets = proj_weights(model, dtype, arr, key)
            f_ = proj_program(passes, trans, interpret)
            t = wall(lambda a: f_(*a), (wsets, xs), reps)
            per_layer = (t - t0) / (passes * (8 if arr == "whole" else layers))
            row[f"proj_{arr}_us"] = round(per_layer * 1e6, 2)
            row[f"proj_{arr}_x"] = round(per_layer * 1e6 / floor_us, 3)
            del wsets
        print(json.dumps(row), flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
