"""Where the layer kernel's 17..64-row launches spend their time: compile vs run, per case, each case in its
own process with a time limit (a hang in one case does not hide the others).

  PYTHONUNBUFFERED=1 python tests/gpu/probe_rows.py [M ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def one(M: int, prenorm):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from check_layer import make_case
    from ftjax.pallas import decode_layer as L
    from ftjax.pallas._common import default_interpret

    rng = np.random.RandomState(0)
    x, pos, kc, vc, p, trans = make_case(rng, M, 1024, 16, 16, 64, 4096, 640, jnp.dtype(jnp.bfloat16), "float")
    cfg = L.LayerConfig(prenorm=prenorm)
    st = L.row_stats(x)
    ip = default_interpret()
    cnt = L.layer_counters(x, kc, p, trans, config=cfg, interpret=ip)
    fn = jax.jit(lambda x, st, pos, kc, vc, cnt, p: L.decode_layer(x, st, pos, kc, vc, cnt, p, trans=trans,
                                                                    norm="layernorm", act="gelu_tanh", config=cfg, interpret=ip))
    t0 = time.perf_counter()
    c = fn.lower(x, st, pos, kc, vc, cnt, p).compile()
    t1 = time.perf_counter()
    print(f"M={M} prenorm={prenorm}: compiled in {t1 - t0:.1f} s", flush=True)
    o = jax.block_until_ready(c(x, st, pos, kc, vc, cnt, p))
    t2 = time.perf_counter()
    print(f"M={M} prenorm={prenorm}: first run {1e3 * (t2 - t1):.1f} ms, counters zeroed "
          f"{int(np.abs(np.asarray(o[4])).sum()) == 0}", flush=True)
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        o = jax.block_until_ready(c(x, st, pos, kc, vc, o[4], p))
        ts.append(time.perf_counter() - t)
    print(f"M={M} prenorm={prenorm}: run {1e6 * sorted(ts)[5]:.0f} us (median of 10, with call overhead)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(int(sys.argv[2]), {"None": None, "True": True, "False": False}[sys.argv[3]])
        sys.exit(0)
    cases = [(16, "None"), (17, "None"), (32, "None"), (64, "False"), (64, "True")]
    for M, pn in cases:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", str(M), pn], timeout=int(os.environ.get("T", 60)))
            print(f"M={M} prenorm={pn}: rc {r.returncode}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"M={M} prenorm={pn}: TIMED OUT", flush=True)
