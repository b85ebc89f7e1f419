"""Attention kernel benchmark (GPU): Pallas decode / prefill beside XLA and jax.nn.dot_product_attention.

  PYTHONUNBUFFERED=1 python bench/attention.py --out $OUT [--parts copy,decode,model,prefill,tune]

Decode: achieved bandwidth = K/V bytes of the valid length read by one call / time of one call
(every row's length = the cache length). Prefill: TFLOP/s counting only the unmasked causal work,
4 * b * n * h * t * (t + 1) / 2 flops. All in bf16. The full table goes to --out (attention.md,
attention.jsonl); a short summary is printed last.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from bench.common import calls_per_program, copy_bandwidth, device_info, n_rotations, time_call
from ftjax.pallas import ops
from ftjax.pallas.decode_attention import DecodeConfig, decode_attention
from ftjax.pallas.prefill_attention import PrefillConfig, prefill_attention

BF16 = jnp.bfloat16
ROWS = []
JSONL = None   # path; every row is appended as soon as it is measured


def emit(row):
  ROWS.append(row)
  print(json.dumps(row), flush=True)
  if JSONL:
    with open(JSONL, "a") as f:
      f.write(json.dumps(row) + "\n")


def _rand(key, shape, dtype=BF16, max_rows=8):
  """Random normal data; big batches tile the first `max_rows` rows (bandwidth is the same)."""
  b = shape[0]
  base = jax.random.normal(key, (min(b, max_rows),) + tuple(shape[1:]), dtype)
  if b > max_rows:
    reps = -(-b // max_rows)
    base = jnp.tile(base, (reps,) + (1,) * (len(shape) - 1))[:b]
  return base


# ----------------------------------------------------------------------------------- decode
DECODE_SHAPES = []   # (b, s, n, kh, h)
for (n, kh, h) in [(16, 16, 128), (32, 32, 64), (32, 8, 128), (16, 16, 64)]:
  for b in (1, 8, 32, 128):
    for s in (512, 2048, 8192):
      if (n, kh, h) == (16, 16, 64) and (b, s) != (32, 2048):
        continue   # 16 heads x 64: only the reference point
      DECODE_SHAPES.append((b, s, n, kh, h))


def decode_impls(config=None):
  def pallas(q, kc, vc, ln, kt, vt):
    return decode_attention(q, kc, vc, ln, config=config)

  def xla(q, kc, vc, ln, kt, vt):
    return ops.xla_decode_attention(q, kc, vc, ln)

  def dpa(q, kc, vc, ln, kt, vt, impl=None):
    return jax.nn.dot_product_attention(q[:, None], kt, vt, key_value_seq_lengths=ln,
                                        implementation=impl)[:, 0]

  return {"pallas": pallas, "xla": xla, "dpa_xla": functools.partial(dpa, impl="xla"),
          "dpa_cudnn": functools.partial(dpa, impl="cudnn")}


def bench_decode(shapes, impl_names, config=None, tag="", reps=7):
  """Returns {shape: {impl: GB/s}}."""
  res = {}
  for (b, s, n, kh, h) in shapes:
    kv_bytes = 2 * b * kh * s * h * 2
    r = n_rotations(kv_bytes, cap=8)
    calls = calls_per_program(kv_bytes / 2.5e12, r, cap=32)
    key = jax.random.key(b * 7 + s + n + h)
    need_t = any(x.startswith("dpa") for x in impl_names)
    bufs = []
    for i in range(r):
      k2, k3, key = jax.random.split(key, 3)
      kc, vc = _rand(k2, (b, kh, s, h)), _rand(k3, (b, kh, s, h))
      # dot_product_attention wants [b, s, k, h]: it gets its own layout (not timed).
      bufs.append((kc, vc, jnp.swapaxes(kc, 1, 2) if need_t else None,
                   jnp.swapaxes(vc, 1, 2) if need_t else None))
    ln = jnp.full((b,), s, jnp.int32)
    qs = jax.random.normal(key, (calls, b, n, h), BF16)
    sets = [(qs[j], bufs[j % r][0], bufs[j % r][1], ln, bufs[j % r][2], bufs[j % r][3])
            for j in range(calls)]
    impls = decode_impls(config)
    for name in impl_names:
      try:
        t, _ = time_call(impls[name], sets, reps=reps)
        gbps = kv_bytes / t / 1e9
        res.setdefault((b, s, n, kh, h), {})[name] = gbps
        emit(dict(kind="decode", impl=name + tag, b=b, s=s, n=n, kh=kh, h=h,
                  kv_MB=round(kv_bytes / 1e6, 1), us=round(t * 1e6, 2),
                  GBps=round(gbps, 1), rot=r, calls=calls))
      except Exception as e:  # noqa: BLE001 - a baseline that does not run is recorded
        emit(dict(kind="decode", impl=name + tag, b=b, s=s, n=n, kh=kh, h=h,
                  error=f"{type(e).__name__}: {str(e)[:300]}"))
    del sets, bufs, qs
  return res


def bench_model(layers=24, b=8, s=2048, n=16, h=128, config=None):
  """All layers' decode attention of a 1.3B-shape model (24 x 16 heads x 128) in one call."""
  key = jax.random.key(5)
  caches = []
  for _ in range(layers):
    k1, k2, k3, key = jax.random.split(key, 4)
    caches.append((jax.random.normal(k1, (b, n, h), BF16), _rand(k2, (b, n, s, h)),
                   _rand(k3, (b, n, s, h))))
  ln = jnp.full((b,), s, jnp.int32)
  kv_bytes = layers * 2 * b * n * s * h * 2
  for name, f in [("pallas", lambda q, k, v: decode_attention(q, k, v, ln, config=config)),
                  ("xla", lambda q, k, v: ops.xla_decode_attention(q, k, v, ln))]:
    def all_layers(cs, f=f):
      acc = jnp.zeros((b, n, h), jnp.float32)
      for q, k, v in cs:   # a chain, as in the model (each layer's q depends on the last)
        acc = acc + f((q.astype(jnp.float32) + 1e-3 * acc).astype(BF16), k, v)
      return acc
    t, _ = time_call(all_layers, [(caches,)], reps=10)
    emit(dict(kind="model_decode", impl=name, layers=layers, b=b, s=s, n=n, h=h,
              kv_MB=round(kv_bytes / 1e6, 1), us=round(t * 1e6, 1),
              GBps=round(kv_bytes / t / 1e9, 1)))


# ---------------------------------------------------------------------------------- prefill
PREFILL_SHAPES = []   # (b, t, n, h): 16k tokens per call, model dim 2048
for h in (64, 128):
  for t in (512, 2048, 8192):
    PREFILL_SHAPES.append((16384 // t, t, 2048 // h, h))


def prefill_impls(config=None):
  def pallas(q, k, v, ln):
    return prefill_attention(q, k, v, ln, causal=True, config=config)

  def xla(q, k, v, ln):
    return ops.xla_prefill_attention(q, k, v, ln, causal=True)

  def dpa(q, k, v, ln, impl):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  return {"pallas": pallas, "xla": xla, "dpa_xla": functools.partial(dpa, impl="xla"),
          "dpa_cudnn": functools.partial(dpa, impl="cudnn")}


def bench_prefill(shapes, impl_names, config=None, tag="", reps=5):
  res = {}
  for (b, t, n, h) in shapes:
    flops = 4 * b * n * h * t * (t + 1) / 2
    key = jax.random.key(t + h)
    k1, k2, k3 = jax.random.split(key, 3)
    k_, v_ = (jax.random.normal(k2, (b, t, n, h), BF16), jax.random.normal(k3, (b, t, n, h), BF16))
    qs = jax.random.normal(k1, (2, b, t, n, h), BF16)
    ln = jnp.full((b,), t, jnp.int32)
    sets = [(qs[0], k_, v_, ln), (qs[1], k_, v_, ln)]
    impls = prefill_impls(config)
    for name in impl_names:
      try:
        tm, _ = time_call(impls[name], sets, reps=reps)
        res.setdefault((b, t, n, h), {})[name] = flops / tm / 1e12
        emit(dict(kind="prefill", impl=name + tag, b=b, t=t, n=n, h=h, ms=round(tm * 1e3, 3),
                  TFLOPs=round(flops / tm / 1e12, 1)))
      except Exception as e:  # noqa: BLE001
        emit(dict(kind="prefill", impl=name + tag, b=b, t=t, n=n, h=h,
                  error=f"{type(e).__name__}: {str(e)[:300]}"))
    del sets, qs, k_, v_
  return res


def _tag(cfg):
  return "[" + ",".join(f"{k}={v}" for k, v in cfg.__dict__.items()
                        if v != getattr(type(cfg)(), k)) + "]"


def _best(cands, shapes, run):
  """The candidate with the best geometric mean over shapes (a failing one scores 0)."""
  import math
  scores = {}
  for cfg in cands:
    res = run(shapes, cfg)
    vals = [res.get(sh, {}).get("pallas", 0.0) for sh in shapes]
    scores[cfg] = math.exp(sum(math.log(max(v, 1e-3)) for v in vals) / len(vals))
    print(f"# tune {_tag(cfg)}: geomean {scores[cfg]:.1f}", flush=True)
  best = max(scores, key=scores.get)
  print(f"# tune winner {_tag(best)}", flush=True)
  return best


def tune():
  """Small search; returns (decode MHA cfg, decode GQA cfg, prefill h64 cfg, prefill h128 cfg)."""
  D = DecodeConfig
  mha_shapes = [(1, 8192, 16, 16, 128), (8, 8192, 32, 32, 64), (32, 2048, 16, 16, 64)]
  gqa_shapes = [(8, 8192, 32, 8, 128), (32, 2048, 32, 8, 128), (1, 8192, 32, 8, 128)]
  drun = lambda shapes, cfg: bench_decode(shapes, ["pallas"], config=cfg, tag=_tag(cfg), reps=5)
  mha = _best([D(), D(block_k=64), D(block_k=64, num_warps=8), D(num_warps=8),
               D(mha_dot=True, num_stages=3), D(mha_dot=True, block_k=64, num_stages=4)],
              mha_shapes, drun)
  gqa = _best([D(), D(num_stages=3), D(block_k=64, num_stages=4), D(num_warps=8, num_stages=3)],
              gqa_shapes, drun)
  P = PrefillConfig
  prun = lambda shapes, cfg: bench_prefill(shapes, ["pallas"], config=cfg, tag=_tag(cfg), reps=3)
  p64 = _best([P(128, 64, 4, 3), P(128, 128, 4, 3), P(128, 64, 8, 3), P(64, 64, 4, 3)],
              [(2, 8192, 32, 64), (8, 2048, 32, 64)], prun)
  p128 = _best([P(128, 64, 8, 3), P(128, 128, 8, 2), P(128, 128, 8, 3), P(128, 64, 4, 3),
                P(64, 64, 4, 3)],
               [(2, 8192, 16, 128), (8, 2048, 16, 128)], prun)
  return mha, gqa, p64, p128


def summary(copy_bw):
  print("\n=== summary (bf16) ===")
  print(device_info(), f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
  dec = {}
  for r in ROWS:
    if r["kind"] == "decode" and "GBps" in r and "[" not in r["impl"]:
      dec.setdefault((r["b"], r["s"], r["n"], r["kh"], r["h"]), {})[r["impl"]] = r
  print("decode: b s n/kh h | MB | pallas GB/s (%copy) | xla | dpa_xla | dpa_cudnn | pallas/best-other")
  for key, d in dec.items():
    p = d.get("pallas")
    others = [d[x]["GBps"] for x in ("xla", "dpa_xla", "dpa_cudnn") if x in d]
    if not p:
      continue
    def g(x):
      return f"{d[x]['GBps']:7.0f}" if x in d else "    n/a"
    print(f"  {key[0]:4d} {key[1]:5d} {key[2]:2d}/{key[3]:2d} {key[4]:3d} | {p['kv_MB']:8.1f} | "
          f"{p['GBps']:7.0f} ({100 * p['GBps'] * 1e9 / copy_bw:3.0f}%) | {g('xla')} | "
          f"{g('dpa_xla')} | {g('dpa_cudnn')} | {p['GBps'] / max(others) if others else 0:.2f}")
  pre = {}
  for r in ROWS:
    if r["kind"] == "prefill" and "TFLOPs" in r:
      pre.setdefault((r["b"], r["t"], r["n"], r["h"]), {})[r["impl"]] = r["TFLOPs"]
  print("prefill TFLOP/s: b t n h | " + " | ".join(["pallas", "xla", "dpa_xla", "dpa_cudnn"]))
  for key, d in pre.items():
    print(f"  {key} | " + " | ".join(str(d.get(x, "n/a")) for x in
                                     ["pallas", "xla", "dpa_xla", "dpa_cudnn"]))
    tuned = {k: v for k, v in d.items() if k.startswith("pallas[")}
    if tuned:
      best = max(tuned, key=tuned.get)
      print(f"     best tuned: {tuned[best]} {best}")
  for r in ROWS:
    if r["kind"] == "model_decode":
      print(f"  model decode {r['impl']}: {r['us']} us for {r['layers']} layers, {r['GBps']} GB/s")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--parts", default="copy,tune,prefill,model,decode")
  ap.add_argument("--decode-impls", default="pallas,xla,dpa_xla")
  ap.add_argument("--prefill-impls", default="pallas,xla,dpa_xla,dpa_cudnn")
  args = ap.parse_args()
  parts = args.parts.split(",")
  global JSONL
  os.makedirs(args.out, exist_ok=True)
  JSONL = os.path.join(args.out, "attention.jsonl")
  print(device_info(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
  t0 = time.time()
  copy_bw = float("nan")
  if "copy" in parts:
    cb = copy_bandwidth()
    copy_bw = max(cb.values())
    emit(dict(kind="copy", **{k: round(v / 1e9, 1) for k, v in cb.items()}))
  mha = gqa = p64 = p128 = None
  if "tune" in parts:
    t1 = time.time()
    try:
      mha, gqa, p64, p128 = tune()
      emit(dict(kind="tuned", decode_mha=repr(mha), decode_gqa=repr(gqa), prefill_h64=repr(p64),
                prefill_h128=repr(p128)))
    except Exception:  # noqa: BLE001
      traceback.print_exc()
    print(f"# part tune took {time.time() - t1:.0f}s", flush=True)

  def decode_all():
    names = args.decode_impls.split(",")
    for shp in DECODE_SHAPES:
      cfg = (mha if shp[2] == shp[3] else gqa)
      bench_decode([shp], names, config=cfg)

  def prefill_all():
    names = args.prefill_impls.split(",")
    for shp in PREFILL_SHAPES:
      bench_prefill([shp], names, config=(p64 if shp[3] <= 64 else p128))

  for part, fn in [("prefill", prefill_all), ("model", lambda: bench_model(config=mha)),
                   ("decode", decode_all)]:
    if part in parts:
      t1 = time.time()
      try:
        fn()
      except Exception:  # noqa: BLE001 - keep the other parts
        traceback.print_exc()
      print(f"# part {part} took {time.time() - t1:.0f}s", flush=True)
  summary(copy_bw)
  print(f"# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
