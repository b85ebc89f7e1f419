"""The persistent layer kernel (ftjax/pallas/decode_layer.py) on the GPU: every program of the grid runs at
once and the phases hand data to each other through counters, which only a real GPU exercises.

Per case: the kernel against its float32 reference twin (fresh random inputs, the cache past each row's
position poisoned with NaN), then the same launch repeated: every repeat must give bitwise the same outputs
(a race between programs would move them) and leave the counters zeroed. Shapes from tiny to GPT 1.3B /
6.7B, bf16 / f32 / int8 in both layouts, MHA and GQA, 1..16 rows, positions from 0 to the last slot.

  PYTHONUNBUFFERED=1 timeout 600 python tests/gpu/check_layer.py [--quick]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from check_model import FAILS, report  # noqa: E402


def make_case(rng, M, D, n, kvh, h, F, s, dtype, wmode, norm="layernorm", bias=True, gated=False, rotary=False):
    import jax.numpy as jnp

    from ftjax.pallas import decode_layer as L

    def a(shape, sc=1.0):
        return jnp.asarray(rng.randn(*shape) * sc, dtype)

    def weight(K, N):
        w = rng.randn(K, N) / np.sqrt(K)
        if wmode == "float":
            return jnp.asarray(w, dtype), None, False
        scale = np.abs(w).max(0) / 127.0 + 1e-8
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        t = wmode == "int8t"
        return jnp.asarray(q.T if t else q), jnp.asarray(scale, dtype), t

    vals, trans = {}, []
    dims = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
    for name, (K, N) in zip(L.WEIGHTS, dims):
        w, sc, t = weight(K, N)
        vals[f"w{name}"], vals[f"s{name}"], vals[f"b{name}"] = w, sc, a((N,), 0.1) if bias else None
        trans.append(t)
    for i in (1, 2):
        vals[f"ln{i}_g"] = jnp.asarray(1 + 0.1 * rng.randn(D), dtype)
        vals[f"ln{i}_b"] = a((D,), 0.1) if norm == "layernorm" else None
    if rotary:
        vals["rope"] = jnp.asarray(1.0 / (10000.0 ** (np.arange(0, h, 2) / h)), jnp.float32)
    p = L.LayerParams(**vals)
    x = a((M, D))
    pos = rng.randint(0, s, size=M)
    pos[0] = s - 1
    if M > 1:
        pos[1] = 0
    kc = rng.randn(M, kvh, s, h)
    vc = rng.randn(M, kvh, s, h)
    for b in range(M):                       # past each row's position: NaN (never read)
        kc[b, :, pos[b]:] = np.nan
        vc[b, :, pos[b]:] = np.nan
    return x, jnp.asarray(pos, jnp.int32), jnp.asarray(kc, dtype), jnp.asarray(vc, dtype), p, tuple(trans)


def check(rng, name, *, M, D, n, kvh, h, F, s, dtype="bfloat16", wmode="float", norm="layernorm", bias=True,
          repeats=5, config=None, act="gelu_tanh", phased=False, gated=False, rotary=False):
    import jax
    import jax.numpy as jnp

    from ftjax.pallas import decode_layer as L
    from ftjax.pallas._common import default_interpret

    ip = default_interpret()          # a CPU dry run of this script interprets the kernel
    dt = jnp.dtype(dtype)
    x, pos, kc, vc, p, trans = make_case(rng, M, D, n, kvh, h, F, s, dt, wmode, norm, bias, gated, rotary)
    st = L.row_stats(x)
    cfg = config or L.DEFAULT_CONFIG
    cnt = L.layer_counters(x, kc, p, trans, config=cfg, interpret=ip)
    ref = L.decode_layer_reference(x, st, pos, kc, vc, p, trans=trans, norm=norm, act=act)
    fn = jax.jit(lambda x, st, pos, kc, vc, cnt, p: L.decode_layer(x, st, pos, kc, vc, cnt, p, trans=trans,
                                                                    norm=norm, act=act, config=cfg, interpret=ip,
                                                                    phased=phased))
    outs = []
    for _ in range(repeats):
        o = jax.block_until_ready(fn(x, st, pos, kc, vc, cnt, p))
        outs.append([np.asarray(t.astype(jnp.float32) if t.dtype != jnp.int32 else t) for t in o])
    got = outs[0]
    tol = 1e-3 if dt == jnp.float32 else 6e-2
    scale = float(np.max(np.abs(np.asarray(ref[0], np.float32)))) + 1e-6
    ex = float(np.max(np.abs(got[0] - np.asarray(ref[0], np.float32)))) / scale
    pos_np = np.asarray(pos)
    rows = np.arange(M)
    ek = float(np.max(np.abs(got[2][rows, :, pos_np] - np.asarray(ref[2], np.float32)[rows, :, pos_np])))
    ev = float(np.max(np.abs(got[3][rows, :, pos_np] - np.asarray(ref[3], np.float32)[rows, :, pos_np])))
    rs = np.asarray(ref[1], np.float32).sum(-1)
    es = float(np.max(np.abs(got[1].sum(-1) - rs) / (np.abs(rs) + 1.0)))
    finite = all(np.isfinite(got[i]).all() for i in (0, 1))
    same = all(all(np.array_equal(o[i], got[i], equal_nan=True) for i in range(4)) for o in outs[1:])
    zeroed = all(int(np.abs(o[4]).sum()) == 0 for o in outs)
    ok = finite and ex < tol and ek < tol * 4 and ev < tol * 4 and es < tol and same and zeroed
    report(name, ok, f"x rel err {ex:.3g}, new k/v err {ek:.3g}/{ev:.3g}, stats rel err {es:.3g}, "
           f"finite {finite}, repeats bitwise equal {same}, counters zeroed {zeroed}")


def main():
    import jax

    from ftjax.pallas import decode_layer as L

    quick = "--quick" in sys.argv
    print("jax", jax.__version__, jax.devices(), "SMs", getattr(jax.devices()[0], "core_count", None), flush=True)
    rng = np.random.RandomState(0)
    cases = [
        ("tiny f32", dict(M=2, D=64, n=4, kvh=4, h=16, F=128, s=64, dtype="float32")),
        ("tiny gqa rms nobias", dict(M=3, D=128, n=8, kvh=2, h=32, F=256, s=128, norm="rmsnorm", bias=False)),
        ("ragged D=80 F=96", dict(M=1, D=80, n=4, kvh=4, h=32, F=96, s=32, dtype="float32")),
        ("350m b2", dict(M=2, D=1024, n=16, kvh=16, h=64, F=4096, s=640)),
        ("1.3b b2", dict(M=2, D=2048, n=16, kvh=16, h=128, F=8192, s=640)),
        ("1.3b b2 int8t", dict(M=2, D=2048, n=16, kvh=16, h=128, F=8192, s=640, wmode="int8t")),
        ("1.3b b2 int8kn", dict(M=2, D=2048, n=16, kvh=16, h=128, F=8192, s=640, wmode="int8")),
        ("1.3b b16", dict(M=16, D=2048, n=16, kvh=16, h=128, F=8192, s=256)),
        ("350m b64 (prenorm)", dict(M=64, D=1024, n=16, kvh=16, h=64, F=4096, s=640)),
        ("1.3b b64 int8t (prenorm)", dict(M=64, D=2048, n=16, kvh=16, h=128, F=8192, s=640, wmode="int8t")),
        ("llama-like b40 gqa rotary gated", dict(M=40, D=1024, n=8, kvh=2, h=128, F=2816, s=640, norm="rmsnorm",
                                                 bias=False, act="silu", gated=True, rotary=True)),
        ("gqa 8x4 b5 gelu", dict(M=5, D=1024, n=8, kvh=4, h=128, F=2816, s=2048, act="gelu")),
        ("6.7b b1", dict(M=1, D=4096, n=32, kvh=32, h=128, F=16384, s=640)),
        ("6.7b b1 int8t", dict(M=1, D=4096, n=32, kvh=32, h=128, F=16384, s=640, wmode="int8t")),
    ]
    if quick:
        cases = cases[:2] + cases[4:6]
    if "--cpu" in sys.argv:
        cases = cases[:3]
    # A ladder first, so that a failure says where it is: one program doing everything (no program waits for
    # another), then a launch per phase on the whole grid (fixups across programs, no waits between phases),
    # then the real thing.
    lad = dict(M=2, D=1024, n=16, kvh=16, h=64, F=4096, s=640)
    check(rng, "ladder 1: one program", **lad, config=L.LayerConfig(programs=1))
    check(rng, "ladder 2: a launch per phase", **lad, phased=True)
    check(rng, "ladder 3: one launch", **lad)
    for name, kw in cases:
        check(rng, name, **kw)
    for extra in ([] if quick else [dict(num_warps=4), dict(num_stages=2), dict(programs_per_sm=2)]):
        check(rng, f"1.3b b2 config {extra}", M=2, D=2048, n=16, kvh=16, h=128, F=8192, s=640,
              config=L.LayerConfig(**extra))
    print("ALL PASS" if not FAILS else f"{len(FAILS)} FAILED: {FAILS}", flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
