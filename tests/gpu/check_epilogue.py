"""Projections that finish their own split-K partials (`small_linear_epilogue`, the fused decode step with
`ftjax.layers.linear.PROJ_EPILOGUE`) on the GPU, where the programs of a column block really race:

- kernels: every mode (activation of one weight, gated activation of two, residual add + row statistics)
  against a float32 twin, at the decode step's shapes (GPT 1.3B: 16-32 splits) and small ragged ones, bf16
  and float32 inputs, int8 weights with scales; then the same call 200 times in one jit, each call taking the
  counters the previous one returned: every result bitwise equal to the first (the sum order does not depend
  on which program arrives last) and the counters zero at the end;
- models: the decode step with the epilogues against the default fused step ("stats"), GPT-2- and
  LLaMA-like (gated SiLU, RMSNorm, rotary, GQA), float32 (token for token, log probs within 2e-3) and
  bfloat16 (log probs of the common prefix within 0.1; a near-tie may flip a token), float and int8
  weights, batch 1 and 8 (the combinations in COMBOS).

  PYTHONUNBUFFERED=1 python tests/gpu/check_epilogue.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from check_model import FAILS, report  # noqa: E402

REPEATS = 200
COMBOS = [  # (dtype, model, int8, batch) of the model check
    ("float32", "gpt2-like", False, 1), ("float32", "gpt2-like", True, 8), ("float32", "llama-like", False, 8),
    ("float32", "llama-like", True, 1), ("bfloat16", "gpt2-like", False, 1), ("bfloat16", "llama-like", True, 8),
]


def _twin(x, ws, scales, biases, residual, mode, act, trans):
    """float32 numpy-side twin (through jnp on the host's float32 arithmetic)."""
    import jax.numpy as jnp

    from ftjax.layers.mlp import activation

    xf = np.asarray(x.astype(jnp.float32))
    ys = []
    for w, s, b, t in zip(ws, scales, biases, trans):
        wf = np.asarray(w.astype(x.dtype).astype(jnp.float32))
        y = xf @ (wf.T if t else wf)
        if s is not None:
            y = y * np.asarray(s, np.float32)
        if b is not None:
            y = y + np.asarray(b.astype(jnp.float32))
        ys.append(y)
    rnd = lambda v: np.asarray(jnp.asarray(v).astype(x.dtype).astype(jnp.float32))  # noqa: E731
    if mode == "act":
        h = np.asarray(activation(act, jnp.asarray(rnd(ys[-1]))))
        if len(ys) == 2:
            h = h * rnd(ys[0])
        return rnd(h), None
    out = rnd(np.asarray(residual.astype(jnp.float32)) + ys[0])
    return out, (out.sum(1), (out * out).sum(1))


def kernels():
    import jax
    import jax.numpy as jnp

    from ftjax.pallas.small_linear import DEFAULT_CONFIG, choose_config, small_linear_epilogue

    rng = np.random.default_rng(0)
    cases = [  # (M, K, N, weights, mode, act, dtype, int8)
        (1, 2048, 2048, 1, "residual", None, jnp.bfloat16, False),     # 1.3B o
        (1, 8192, 2048, 1, "residual", None, jnp.bfloat16, False),     # 1.3B MLP out
        (1, 2048, 8192, 1, "act", "gelu", jnp.bfloat16, False),        # 1.3B MLP in
        (8, 2048, 2816, 2, "act", "silu", jnp.bfloat16, False),        # gated
        (1, 8192, 2048, 1, "residual", None, jnp.bfloat16, True),      # int8, transposed, scales
        (3, 2048, 8192, 1, "act", "gelu_tanh", jnp.bfloat16, True),
        (16, 1000, 333, 1, "residual", None, jnp.float32, False),      # ragged K and N, float32
        (5, 777, 190, 2, "act", "relu", jnp.float32, False),
    ]
    for M, K, N, nw, mode, act, dt, int8 in cases:
        x = jnp.asarray(rng.standard_normal((M, K)), dt)
        if int8:
            ws = [jnp.asarray(rng.integers(-127, 128, (N, K)), jnp.int8) for _ in range(nw)]
            scales = [jnp.asarray(rng.uniform(0.5, 1.5, N) / (127 * np.sqrt(K)), jnp.float32) for _ in range(nw)]
            trans = [True] * nw
        else:
            ws = [jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dt) for _ in range(nw)]
            scales, trans = [None] * nw, [False] * nw
        biases = [jnp.asarray(rng.standard_normal(N) * 0.1, dt) for _ in range(nw)]
        res = jnp.asarray(rng.standard_normal((M, N)), dt) if mode == "residual" else None
        cfg = choose_config(M, K, (N,) * nw, jnp.dtype(jnp.int8 if int8 else dt), DEFAULT_CONFIG, kmajor=int8)
        want, wst = _twin(x, ws, scales, biases, res, mode, act, trans)
        cnt = jnp.zeros((max(N, 64),), jnp.int32)

        def one(c):
            return small_linear_epilogue(x, ws, c, mode=mode, scales=scales, biases=biases, residual=res, act=act,
                                         transposed=trans)

        @jax.jit
        def many(c):          # the first result, then 199 more calls on the returned counters
            y, st, c = one(c)

            def again(i, carry):
                bad, c = carry
                y2, _, c = one(c)
                return bad | (y2 != y).any(), c
            bad, c = jax.lax.fori_loop(0, REPEATS - 1, again, (jnp.bool_(False), c))
            return y, st, c, bad

        y, st, c, bad = many(cnt)
        y = np.asarray(y.astype(jnp.float32))
        tol = 2e-2 if dt == jnp.bfloat16 else 1e-4
        e = float(np.max(np.abs(y - want)) / (np.max(np.abs(want)) + 1e-6))
        ok = e < tol and not bool(bad) and int(np.abs(np.asarray(c)).sum()) == 0
        detail = f"rel err {e:.3g}, {REPEATS} calls bitwise equal {not bool(bad)}, counters zero {int(np.abs(np.asarray(c)).sum()) == 0}"
        if wst is not None:
            st = np.asarray(st)
            es = max(float(np.max(np.abs(st[0].sum(-1) - wst[0]))) / (np.max(np.abs(wst[0])) + 1.0),
                     float(np.max(np.abs(st[1].sum(-1) - wst[1]) / wst[1].max())))
            ok = ok and es < 1e-3
            detail += f", stats rel err {es:.3g}"
        report(f"epilogue {mode} {act or ''} M={M} K={K} N={N} w={nw} {jnp.dtype(dt).name} int8={int8} "
               f"splits={cfg.num_splits}", ok, detail)


def models():
    import jax

    import ftjax
    from ftjax import quantize as Q
    from ftjax.config import ModelConfig
    from ftjax.layers import linear
    from ftjax.models import gpt

    shapes = {
        "gpt2-like": ModelConfig(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, ffn_dim=4096,
                                 max_positions=512, bos_id=0, eos_id=1),
        "llama-like": ModelConfig(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, num_kv_heads=4,
                                  ffn_dim=2816, max_positions=512, norm="rmsnorm", position="rotary", activation="silu",
                                  gated_ffn=True, tie_embeddings=False, attn_bias=False, mlp_bias=False,
                                  bos_id=0, eos_id=1),
    }
    rng = np.random.RandomState(0)
    bases = {name: gpt.init_params(cfg, seed=1) for name, cfg in shapes.items()}
    for dtype, name, int8, b in COMBOS:
        cfg = shapes[name]
        params = Q.quantize_params(bases[name], cfg) if int8 else bases[name]
        prompts = [rng.randint(2, cfg.vocab_size, size=int(rng.randint(5, 60))).tolist() for _ in range(b)]
        res = {}
        for epi in (False, True):
            linear.PROJ_EPILOGUE = epi
            jax.clear_caches()
            llm = ftjax.LLM(cfg, params, dtype=dtype, max_batch_size=b, max_seq_len=256)
            res[epi] = llm.generate(prompts, max_new_tokens=24, end_id=None, return_log_probs=True)
        linear.PROJ_EPILOGUE = False
        a, r = res[True], res[False]
        agree = [next((i for i, (p, q) in enumerate(zip(ta, tb)) if p != q), len(ta))
                 for ta, tb in zip(a.tokens, r.tokens)]
        lp = max(float(np.max(np.abs(np.asarray(la, np.float32)[:n] - np.asarray(lb, np.float32)[:n])))
                 if n else 0.0 for la, lb, n in zip(a.output_log_probs, r.output_log_probs, agree))
        ok = (min(agree) == 24 and lp < 2e-3) if dtype == "float32" else lp < 0.1
        report(f"model {dtype} {name} int8={int8} b{b} epilogue vs stats", ok,
               f"tokens agree for {agree} of 24, max log-prob diff {lp:.3g}")


def main():
    import jax

    print("jax", jax.__version__, jax.devices(), flush=True)
    kernels()
    models()
    print("ALL PASSED" if not FAILS else "FAILED: " + ", ".join(FAILS), flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
