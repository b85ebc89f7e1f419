"""Inside the persistent layer kernel (ftjax/pallas/decode_layer.py) on the GPU: per-phase time stamps of
every program, and the kernel's time per layer.

    PYTHONUNBUFFERED=1 python bench/layer_trace.py --models 1.3b,350m --weights bf16,int8t [--rows 2]
        [--context 512] [--layer 'prefetch_tiles=2'] [--out $OUT]

A profiler sees one kernel per layer; this shows what happens in it. For each (model, weights, config):
- the time per layer: the model's layers (random weights, N(0, 0.02), each layer its own, so nothing is
  served from the L2 twice) run back to back in one jitted call, once and three times over; the difference
  of the two medians over twice the layers (no call overhead in it), and the weight bytes over it (GB/s);
- one traced launch (`decode_layer_traced`): for each event of EVENTS, over the programs that reach it,
  the min / median / max time in us after the first program started (%globaltimer: its resolution is the
  GPU's, ~32 ns to 1 us), and each phase's wait (the time from a program's previous event to the end of
  its wait). Rows: `--rows` sequences (2 = a batch-1 engine's decode state), each at `--context` keys.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bench.e2e import MODELS, SMOKE_MODELS  # noqa: E402


def layer_inputs(cfg, weights: str, M: int, context: int, seed: int):
    """Random inputs of one layer of model `cfg` (a bench/e2e.py dict): x, stats, positions, caches,
    LayerParams, trans, norm, act."""
    import jax
    import jax.numpy as jnp

    from ftjax.pallas import decode_layer as L

    key = jax.random.key(seed)
    D, n, F = cfg["hidden"], cfg["num_heads"], cfg["ffn_dim"]
    kvh = cfg.get("num_kv_heads", n)
    h = D // n
    gated = cfg.get("gated_ffn", False)
    norm = cfg.get("norm", "layernorm")
    bias = cfg.get("attn_bias", True)
    bf = jnp.bfloat16
    ks = iter(jax.random.split(key, 64))
    vals, trans = {}, []
    dims = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
    for name, (K, N) in zip(L.WEIGHTS, dims):
        w = 0.02 * jax.random.normal(next(ks), (K, N), jnp.float32)
        if weights.startswith("int8"):
            sc = jnp.max(jnp.abs(w), 0) / 127.0
            q = jnp.round(w / sc).astype(jnp.int8)
            t = weights == "int8t"
            vals[f"w{name}"], vals[f"s{name}"] = (q.T if t else q), sc.astype(bf)
            trans.append(t)
        else:
            vals[f"w{name}"], vals[f"s{name}"] = w.astype(bf), None
            trans.append(False)
        vals[f"b{name}"] = jnp.zeros((N,), bf) if bias else None
    for i in (1, 2):
        vals[f"ln{i}_g"] = jnp.ones((D,), bf)
        vals[f"ln{i}_b"] = jnp.zeros((D,), bf) if norm == "layernorm" else None
    if cfg.get("position") == "rotary":
        vals["rope"] = jnp.asarray(1.0 / (10000.0 ** (np.arange(0, h, 2) / h)), jnp.float32)
    s = -(-(context + 1) // 128) * 128
    x = jax.random.normal(next(ks), (M, D), jnp.float32).astype(bf)
    kc = jax.random.normal(next(ks), (M, kvh, s, h), jnp.float32).astype(bf)
    vc = jax.random.normal(next(ks), (M, kvh, s, h), jnp.float32).astype(bf)
    pos = jnp.full((M,), context, jnp.int32)
    return x, L.row_stats(x), pos, kc, vc, L.LayerParams(**vals), tuple(trans), norm, cfg.get("activation", "gelu_tanh")


def main():
    import jax

    from bench.step_ab import layer_kwargs
    from ftjax.pallas import decode_layer as L

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1.3b")
    ap.add_argument("--weights", default="bf16,int8t")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layers", type=int, default=0, help="layers in the timed chain (0: the model's)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layer", nargs="*", default=[""], help="LayerConfig variants, each 'field=value,field=value'")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    from ftjax.pallas._common import default_interpret

    ip = default_interpret()      # a CPU dry run (tiny-gpt) interprets the kernel: its stamps are placeholders
    print("jax", jax.__version__, jax.devices()[0].device_kind, "SMs", L.device_sms(), flush=True)
    rows = []
    for model in a.models.split(","):
        cfg = {**MODELS, **SMOKE_MODELS}[model]
        n_layers = a.layers or cfg["num_layers"]
        for wq in a.weights.split(","):
            layers = [layer_inputs(cfg, wq, a.rows, a.context, seed) for seed in range(n_layers)]
            x, st, pos, kc, vc, _, trans, norm, act = layers[0]
            params = [lay[5] for lay in layers]
            caches = [(lay[3], lay[4]) for lay in layers]
            wbytes = sum(int(v.nbytes) for v in jax.tree.leaves(params))
            del layers
            for v in a.layer:
                kw = layer_kwargs(v)
                lc = L.LayerConfig(**kw)
                cnt = L.layer_counters(x, kc, params[0], trans, config=lc, interpret=ip)

                def chain(x, st, cnt, caches, params, passes):
                    for _ in range(passes):
                        out = []
                        for (k_, v_), p in zip(caches, params):
                            x, st, k_, v_, cnt = L.decode_layer(x, st, pos, k_, v_, cnt, p, trans=trans, norm=norm,
                                                                act=act, config=lc, interpret=ip)
                            out.append((k_, v_))
                        caches = out
                    return x, st, cnt, caches

                # the time of 1 and of 3 passes over the layers: their difference has no call overhead in it
                f = jax.jit(chain, donate_argnums=(3,), static_argnames=("passes",))
                state = (x, st, cnt, caches)
                med = {}
                for passes in (1, 3):
                    ts = []
                    for i in range(a.reps + 2):
                        t0 = time.perf_counter()
                        xo, sto, cn, cs = f(*state, params, passes=passes)
                        jax.block_until_ready(xo)
                        if i >= 2:
                            ts.append(time.perf_counter() - t0)
                        state = (x, st, cn, cs)
                    med[passes] = statistics.median(ts)
                caches = state[3]     # the chain donated the caches it was given: the next variant takes these
                per_layer = (med[3] - med[1]) / (2 * n_layers)
                _, tr = jax.jit(lambda x, st, cnt, kc, vc, p: L.decode_layer_traced(
                    x, st, pos, kc, vc, cnt, p, trans=trans, norm=norm, act=act, config=lc, interpret=ip))(
                    x, st, state[2], state[3][0][0], state[3][0][1], params[0])
                tr = np.asarray(tr).astype(np.int64)
                t0 = tr[:, L.EV["start"]]
                base = int(t0.min())
                ev = {}
                for name in L.EVENTS:
                    col = tr[:, L.EV[name]]
                    got = col != 0
                    if got.any():
                        d = ((col[got] - base) % (1 << 32)) / 1e3
                        ev[name] = [round(float(np.min(d)), 2), round(float(np.median(d)), 2),
                                    round(float(np.max(d)), 2), int(got.sum())]
                row = {"model": model, "weights": wq, "rows": a.rows, "context": a.context, "config": v or "default",
                       "layer_us": round(per_layer * 1e6, 2), "weights_GBps": round(wbytes / n_layers / per_layer / 1e9, 1),
                       "events_us_min_median_max_programs": ev}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        with open(os.path.join(a.out, "layer_trace.jsonl"), "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    print("| model | weights | config | us a layer | weight GB/s | qkv done | attn done | o done | fc1 done | fc2 done |")
    for r in rows:
        e = r["events_us_min_median_max_programs"]
        cell = lambda k: "/".join(str(x) for x in e.get(k, [])[:3])  # noqa: E731
        print(f"| {r['model']} | {r['weights']} | {r['config']} | {r['layer_us']} | {r['weights_GBps']} | "
              f"{cell('qkv_done')} | {cell('attn_done')} | {cell('o_done')} | {cell('fc1_done')} | {cell('fc2_done')} |")


if __name__ == "__main__":
    main()
