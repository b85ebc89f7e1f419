"""The MLP's 16-bit activation switch (`mlp.ACT_LOW_ROWS`): calls of enough rows apply GELU to the input
projection's bf16 output in bf16 (the form a cuBLASLt bias + GELU epilogue can take), smaller calls keep the
float32 activation; either way the block matches its float32 twin within bf16 rounding."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.layers import mlp as M


def _tanh_dtypes(fn, *args):
    text = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()   # a fresh trace: the rule is read when tracing
    return set(re.findall(r"stablehlo\.tanh %\S+ : tensor<[0-9x]*(bf16|f32)>", text))


def test_act_low_rows(monkeypatch):
    rng = np.random.default_rng()
    d, f = 64, 256
    block = M.MLP(d, f, act="gelu_tanh", dtype=jnp.bfloat16)
    x32 = jnp.asarray(rng.standard_normal((4, 32, d)), jnp.float32)
    params = block.init(jax.random.key(int(rng.integers(1 << 30))), x32)
    twin = M.MLP(d, f, act="gelu_tanh", dtype=jnp.float32)
    # the twin: the bf16-rounded weights and inputs, every product and the activation in float32
    p32 = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    x = x32.astype(jnp.bfloat16)
    ref = np.asarray(twin.apply(p32, x.astype(jnp.float32)))

    run = block.apply
    monkeypatch.setattr(M, "ACT_LOW_ROWS", 64)
    assert _tanh_dtypes(run, params, x) == {"bf16"}             # 128 rows: the 16-bit activation
    assert _tanh_dtypes(run, params, x[:1, :16]) == {"f32"}     # 16 rows: below the rule
    low = np.asarray(run(params, x).astype(jnp.float32))
    monkeypatch.setattr(M, "ACT_LOW_ROWS", None)
    assert _tanh_dtypes(run, params, x) == {"f32"}
    high = np.asarray(run(params, x).astype(jnp.float32))
    scale = np.abs(ref).max()
    for got in (low, high):
        assert np.abs(got - ref).max() <= 0.03 * scale, np.abs(got - ref).max() / scale
    assert not np.array_equal(low, high)   # the switch changed the computation
