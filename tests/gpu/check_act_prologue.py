"""GPU check of the small-M projection's activation prologue (`small_linear_parts(act=...)`, the MLP's output
projection summing the input projection's partials, bias and activation in its own tiles;
`ftjax.layers.mlp.ACT_PROLOGUE`). CPU CI runs the same kernel interpreted and lowered; here it is compiled:

  PYTHONUNBUFFERED=1 python tests/gpu/check_act_prologue.py

- kernel: the prologue's output against the float32 product of x built in XLA the same way (partials summed
  in the kernel's order), at model shapes (1.3B / 350M MLP out, gated LLaMA-like) and ragged ones, bf16 and
  int8 weights (stored transposed), 1 and 8 rows;
- models: ACT_PROLOGUE on against off (the XLA fusion), GPT-2-like (tanh GELU) and LLaMA-like (SwiGLU), bf16
  and int8, batch 1 and 8: greedy tokens and log probs over the common prefix (tanh in Triton and in XLA
  may round differently, so equality is not required: each row's log probs up to its first different token
  must agree within 0.03, and the first 4 tokens of every row must be equal).
Prints PASS / FAIL lines and exits 1 on a failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

FAILS = []


def report(name, ok, detail=""):
    print(("PASS " if ok else "FAIL ") + name + (f"  {detail}" if detail else ""), flush=True)
    if not ok:
        FAILS.append(name)


def kernel_checks():
    import jax
    import jax.numpy as jnp

    from ftjax.layers.mlp import activation
    from ftjax.pallas import small_linear as S

    rng = np.random.RandomState(0)
    for M, K, N, Sp, n_src, act, wd in [(1, 8192, 2048, 8, 1, "gelu_tanh", "bf16"), (1, 4096, 1024, 8, 1, "gelu_tanh", "bf16"),
                                        (8, 8192, 2048, 8, 1, "gelu_tanh", "int8"), (1, 2816, 1024, 4, 2, "silu", "bf16"),
                                        (5, 1000, 300, 3, 2, "relu", "int8")]:
        srcs = [jnp.asarray(rng.randn(Sp, M, K) * 0.3, jnp.float32) for _ in range(n_src)]
        sc = [jnp.asarray(rng.rand(K) + 0.5, jnp.float32) if wd == "int8" else None for _ in range(n_src)]
        bi = [jnp.asarray(rng.randn(K) * 0.1, jnp.float32) for _ in range(n_src)]
        ys = []
        for src, s_, b_ in zip(srcs, sc, bi):
            y = src[0]
            for s in range(1, Sp):
                y = y + src[s]
            y = y if s_ is None else y * s_
            ys.append((y + b_).astype(jnp.bfloat16).astype(jnp.float32))
        x = (activation(act, ys[1]) * ys[0] if n_src == 2 else activation(act, ys[0])).astype(jnp.bfloat16)
        if wd == "int8":
            w = jnp.asarray(rng.randint(-127, 128, (N, K)), jnp.int8)       # stored transposed
            wf = np.asarray(w, np.float32).T
        else:
            w = jnp.asarray(rng.randn(K, N) * 0.05, jnp.bfloat16)
            wf = np.asarray(w, np.float32)
        parts = S.small_linear_parts(jax.ShapeDtypeStruct((M, K), jnp.bfloat16), [w], act=(srcs, sc, bi, act),
                                     transposed=[wd == "int8"], interpret=jax.default_backend() != "gpu")
        got = np.asarray(parts[0].sum(0), np.float64)
        xf = np.asarray(x.astype(jnp.float32), np.float64)
        ref = xf @ wf
        mag = np.abs(xf) @ np.abs(wf)
        # x itself may differ by one bf16 rounding where Triton's tanh / exp and XLA's differ in the last bit
        err = np.abs(got - ref) / np.maximum(mag, 1e-30)
        report(f"kernel M={M} K={K} N={N} S={Sp} {act} {'gated ' if n_src == 2 else ''}{wd}", bool(err.max() < 4e-3),
               f"max err / magnitude {err.max():.2e}, median {np.median(err):.2e}")


def decode(cfg, params, prompts, on, quantize, steps):
    import jax

    import ftjax
    from ftjax import quantize as Q
    from ftjax.layers import mlp

    mlp.ACT_PROLOGUE = on
    jax.clear_caches()
    if quantize:
        params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16)
    llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=len(prompts), max_seq_len=256)
    r = llm.generate(prompts, steps, return_log_probs=True)
    return np.asarray(r.tokens), np.asarray(r.output_log_probs, np.float32)


def model_checks():
    from bench.e2e import random_params
    from ftjax.config import ModelConfig
    from ftjax.layers import mlp

    shapes = {
        "gpt2-like": dict(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, ffn_dim=4096, max_positions=512),
        "llama-like": dict(vocab_size=4096, hidden=1024, num_layers=4, num_heads=16, num_kv_heads=4, ffn_dim=2816,
                           max_positions=512, norm="rmsnorm", position="rotary", activation="silu", gated_ffn=True,
                           tie_embeddings=False, attn_bias=False, mlp_bias=False),
    }
    rng = np.random.RandomState(1)
    default = mlp.ACT_PROLOGUE
    try:
        for name, kw in shapes.items():
            cfg = ModelConfig(**kw)
            params = random_params(cfg)
            for quantize in (None, "int8"):
                for b in (1, 8):
                    prompts = [rng.randint(2, cfg.vocab_size, size=int(rng.randint(5, 60))).tolist() for _ in range(b)]
                    t0, l0 = decode(cfg, params, prompts, False, quantize, 24)
                    t1, l1 = decode(cfg, params, prompts, True, quantize, 24)
                    worst, first = 0.0, []
                    for r in range(b):
                        diff = np.nonzero(t0[r] != t1[r])[0]
                        n = int(diff[0]) if diff.size else t0.shape[1]
                        first.append(n)
                        if n:
                            worst = max(worst, float(np.max(np.abs(l0[r, :n] - l1[r, :n]))))
                    ok = worst < 0.03 and min(first) >= 4
                    report(f"model {name} {quantize or 'bf16'} b{b}", ok,
                           f"rows equal {sum(f == t0.shape[1] for f in first)}/{b}, first difference at "
                           f"{min(first)}, max |dlogp| over the common prefix {worst:.3g}")
    finally:
        mlp.ACT_PROLOGUE = default


if __name__ == "__main__":
    kernel_checks()
    model_checks()
    print(f"{'FAIL' if FAILS else 'ALL PASS'}: {len(FAILS)} failed", flush=True)
    sys.exit(1 if FAILS else 0)
