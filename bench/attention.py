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

from bench.common import copy_bandwidth, device_info, n_rotations, time_call
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
      if (n, kh, h) == (16, 16, 64) and not (b, s) in [(32, 2048), (1, 8192), (128, 2048)]:
        continue   # 16 heads x 64: only the reference point and two more
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


def bench_decode(shapes, impl_names, config=None, tag=""):
  for (b, s, n, kh, h) in shapes:
    kv_bytes = 2 * b * kh * s * h * 2
    r = n_rotations(kv_bytes, cap=8)
    key = jax.random.key(b * 7 + s + n + h)
    sets = []
    need_t = any(x.startswith("dpa") for x in impl_names)
    for i in range(r):
      k1, k2, k3, key = jax.random.split(key, 4)
      q = jax.random.normal(k1, (b, n, h), BF16)
      kc = _rand(k2, (b, kh, s, h))
      vc = _rand(k3, (b, kh, s, h))
      ln = jnp.full((b,), s, jnp.int32)
      # dot_product_attention wants [b, s, k, h]: give it its own layout (not timed).
      kt = jnp.swapaxes(kc, 1, 2) if need_t else None
      vt = jnp.swapaxes(vc, 1, 2) if need_t else None
      sets.append((q, kc, vc, ln, kt, vt))
    impls = decode_impls(config)
    for name in impl_names:
      try:
        t, _ = time_call(impls[name], sets, reps=10)
        emit(dict(kind="decode", impl=name + tag, b=b, s=s, n=n, kh=kh, h=h,
                  kv_MB=round(kv_bytes / 1e6, 1), us=round(t * 1e6, 2),
                  GBps=round(kv_bytes / t / 1e9, 1), rot=r))
      except Exception as e:  # noqa: BLE001 - a baseline that does not run is recorded
        emit(dict(kind="decode", impl=name + tag, b=b, s=s, n=n, kh=kh, h=h,
                  error=f"{type(e).__name__}: {str(e)[:200]}"))
    del sets


def bench_model(layers=24, b=8, s=2048, n=16, h=128):
  """All layers' decode attention of a 1.3B-shape model (24 x 16 heads x 128) in one call."""
  key = jax.random.key(5)
  caches = []
  for _ in range(layers):
    k1, k2, k3, key = jax.random.split(key, 4)
    caches.append((jax.random.normal(k1, (b, n, h), BF16), _rand(k2, (b, n, s, h)),
                   _rand(k3, (b, n, s, h))))
  ln = jnp.full((b,), s, jnp.int32)
  kv_bytes = layers * 2 * b * n * s * h * 2
  for name, f in [("pallas", lambda q, k, v: decode_attention(q, k, v, ln)),
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


def bench_prefill(shapes, impl_names, config=None, tag=""):
  for (b, t, n, h) in shapes:
    flops = 4 * b * n * h * t * (t + 1) / 2
    key = jax.random.key(t + h)
    k1, k2, k3 = jax.random.split(key, 3)
    sets = [(jax.random.normal(k1, (b, t, n, h), BF16), jax.random.normal(k2, (b, t, n, h), BF16),
             jax.random.normal(k3, (b, t, n, h), BF16), jnp.full((b,), t, jnp.int32))]
    impls = prefill_impls(config)
    for name in impl_names:
      try:
        tm, _ = time_call(impls[name], sets, reps=10)
        emit(dict(kind="prefill", impl=name + tag, b=b, t=t, n=n, h=h, ms=round(tm * 1e3, 3),
                  TFLOPs=round(flops / tm / 1e12, 1)))
      except Exception as e:  # noqa: BLE001
        emit(dict(kind="prefill", impl=name + tag, b=b, t=t, n=n, h=h,
                  error=f"{type(e).__name__}: {str(e)[:200]}"))
    del sets


def tune():
  dec_shapes = [(1, 8192, 16, 16, 128), (32, 2048, 16, 16, 64), (8, 8192, 32, 8, 128),
                (128, 2048, 32, 32, 64)]
  for cfg in [DecodeConfig(block_k=64), DecodeConfig(block_k=64, num_warps=8),
              DecodeConfig(num_warps=8), DecodeConfig(mha_dot=True),
              DecodeConfig(mha_dot=True, num_stages=3), DecodeConfig(target_programs=1056)]:
    tag = "[" + ",".join(f"{k}={v}" for k, v in cfg.__dict__.items()
                         if v != getattr(DecodeConfig(), k)) + "]"
    bench_decode(dec_shapes, ["pallas"], config=cfg, tag=tag)
  pre_shapes = [(2, 8192, 16, 128), (2, 8192, 32, 64), (8, 2048, 16, 128)]
  for cfg in [PrefillConfig(block_q=128, block_k=128, num_warps=8, num_stages=2),
              PrefillConfig(block_q=128, block_k=64, num_warps=4, num_stages=3),
              PrefillConfig(block_q=64, block_k=64, num_warps=4, num_stages=3),
              PrefillConfig(block_q=128, block_k=32, num_warps=4, num_stages=4)]:
    tag = "[" + ",".join(f"{k}={v}" for k, v in cfg.__dict__.items()) + "]"
    bench_prefill(pre_shapes, ["pallas"], config=cfg, tag=tag)


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
  ap.add_argument("--parts", default="copy,decode,model,prefill,tune")
  ap.add_argument("--decode-impls", default="pallas,xla,dpa_xla,dpa_cudnn")
  ap.add_argument("--prefill-impls", default="pallas,xla,dpa_xla,dpa_cudnn")
  args = ap.parse_args()
  parts = args.parts.split(",")
  global JSONL
  os.makedirs(args.out, exist_ok=True)
  JSONL = os.path.join(args.out, "attention.jsonl")
  print(device_info(), time.strftime("%Y-%m-%d %H:%M:%S"), flush=True)
  t0 = time.time()
  copy_bw = copy_bandwidth() if "copy" in parts else float("nan")
  emit(dict(kind="copy", GBps=round(copy_bw / 1e9, 1)))
  for part, fn in [("decode", lambda: bench_decode(DECODE_SHAPES, args.decode_impls.split(","))),
                   ("prefill", lambda: bench_prefill(PREFILL_SHAPES, args.prefill_impls.split(","))),
                   ("model", bench_model),
                   ("tune", tune)]:
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
