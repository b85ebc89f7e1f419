"""Projections that finish their own split-K partials (`small_linear_epilogue`; the fused decode step with
`ftjax.layers.linear.PROJ_EPILOGUE`), interpreted on CPU, against float32 twins on fresh random inputs: the
activation of one weight and the gated activation of two, the residual add with its row statistics, with
int8 weights and scales, biases, an input normalised on the fly, ragged K and N, one and several splits; the
counters come back zero, so the next call can take them; bad arguments are refused by name; a decode step
with the epilogues gives XLA's tokens and log probs, with three projection launches a layer and no separate
residual-add kernels, and lowers for CUDA."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import quantize as Q
from ftjax.config import ModelConfig
from ftjax.layers import linear
from ftjax.layers.mlp import activation
from ftjax.models import gpt
from ftjax.pallas.add_norm import add_stats, norm_from_stats
from ftjax.pallas.small_linear import SmallLinearConfig, small_linear_epilogue, small_linear_reference


def _rng():
    seed = np.random.randint(1 << 30)
    return seed, np.random.RandomState(seed)


def _twin(x, ws, scales, biases, residual, mode, act, trans):
    ys = small_linear_reference(x, ws, scales, transposed=trans)
    ys = [y if b is None else y + b.astype(jnp.float32) for y, b in zip(ys, biases)]
    rnd = lambda v: v.astype(x.dtype).astype(jnp.float32)  # noqa: E731
    if mode == "act":
        h = activation(act, rnd(ys[-1]))
        return (h * rnd(ys[0]) if len(ys) == 2 else h).astype(x.dtype)
    return (residual.astype(jnp.float32) + ys[0]).astype(x.dtype)


CASES = [  # M, K, N, weights, mode, act, dtype, int8, norm, config (block_n, block_k, splits)
    (1, 96, 64, 1, "residual", None, "float32", False, None, (32, 32, 3)),
    (3, 100, 70, 1, "residual", None, "bfloat16", True, "layernorm", (32, 32, 4)),
    (2, 64, 96, 1, "act", "gelu", "float32", False, "rmsnorm", (32, 32, 2)),
    (5, 72, 40, 2, "act", "silu", "bfloat16", False, None, (16, 32, 3)),
    (16, 64, 48, 2, "act", "gelu_tanh", "float32", True, None, (16, 32, 1)),
    (4, 64, 50, 1, "residual", None, "float32", False, None, (64, 64, 1)),
]


@pytest.mark.parametrize("M,K,N,nw,mode,act,dt,int8,norm,cfg", CASES)
def test_epilogue_matches_twin(M, K, N, nw, mode, act, dt, int8, norm, cfg):
    seed, rng = _rng()
    x = jnp.asarray(rng.randn(M, K), dt)
    if int8:
        ws = [jnp.asarray(rng.randint(-127, 128, (N, K)), jnp.int8) for _ in range(nw)]
        scales = [jnp.asarray(rng.rand(N) * 0.02 + 0.01, jnp.float32) for _ in range(nw)]
        trans = [True] * nw
    else:
        ws = [jnp.asarray(rng.randn(K, N) / np.sqrt(K), dt) for _ in range(nw)]
        scales, trans = None, None
    biases = [jnp.asarray(rng.randn(N), dt) if i == 0 else None for i in range(nw)]
    res = jnp.asarray(rng.randn(M, N), dt) if mode == "residual" else None
    nspec = None
    xin = x
    if norm is not None:
        xs, st0 = add_stats(x, interpret=True)
        g = jnp.asarray(rng.rand(K) + 0.5, dt)
        b = jnp.asarray(rng.randn(K), dt) if norm == "layernorm" else None
        nspec = (st0, g, b, norm, 1e-5)
        xin = norm_from_stats(xs, st0, g, b, kind=norm)
    bn, bk, sp = cfg
    config = SmallLinearConfig(block_n=bn, block_k=bk, num_splits=sp)
    counters = jnp.zeros((N // 8 + 1,), jnp.int32)
    y, st, c = small_linear_epilogue(x, ws, counters, mode=mode, scales=scales, biases=biases, residual=res, act=act,
                                     norm=nspec, config=config, interpret=True, transposed=trans)
    want = _twin(xin, ws, scales, biases, res, mode, act, trans)
    assert y.shape == (M, N) and y.dtype == jnp.dtype(dt)
    tol = 2e-5 if dt == "float32" else 0.03
    scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32))))
    assert err < tol * scale, f"seed {seed}: max err {err}"
    assert not np.asarray(c).any(), f"seed {seed}: counters left {np.asarray(c)}"
    if mode == "residual":
        nb = -(-N // bn)
        assert st.shape == (2, M, nb)
        yf = y.astype(jnp.float32)      # the statistics are of y as rounded
        np.testing.assert_allclose(np.asarray(st[0].sum(-1)), np.asarray(yf.sum(-1)), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(st[1].sum(-1)), np.asarray((yf * yf).sum(-1)), rtol=1e-5, atol=1e-4)
    else:
        assert st is None
    # the returned counters serve the next call: the same result again
    y2, _, c2 = small_linear_epilogue(x, ws, c, mode=mode, scales=scales, biases=biases, residual=res, act=act,
                                      norm=nspec, config=config, interpret=True, transposed=trans)
    assert np.array_equal(np.asarray(y2), np.asarray(y)) and not np.asarray(c2).any(), f"seed {seed}"


def test_epilogue_rejects_bad_arguments():
    x = jnp.zeros((2, 64), jnp.float32)
    w = jnp.zeros((64, 32), jnp.float32)
    cnt = jnp.zeros((8,), jnp.int32)
    with pytest.raises(AssertionError, match="mode="):
        small_linear_epilogue(x, [w], cnt, mode="gelu", interpret=True)
    with pytest.raises(AssertionError, match="residual"):
        small_linear_epilogue(x, [w], cnt, mode="residual", residual=jnp.zeros((2, 31)), interpret=True)
    with pytest.raises(AssertionError, match="act="):
        small_linear_epilogue(x, [w], cnt, mode="act", act="tanh", interpret=True)
    with pytest.raises(AssertionError, match="one weight"):
        small_linear_epilogue(x, [w, w], cnt, mode="residual", residual=jnp.zeros((2, 32)), interpret=True)
    with pytest.raises(AssertionError, match="counters must be int32"):
        small_linear_epilogue(x, [w], cnt.astype(jnp.float32), mode="act", act="relu", interpret=True)
    with pytest.raises(AssertionError, match="column blocks"):
        small_linear_epilogue(x, [w], jnp.zeros((1,), jnp.int32), mode="act", act="relu", interpret=True,
                              config=SmallLinearConfig(block_n=16, block_k=32, num_splits=2))


SHAPES = {
    "gpt2": dict(),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


def _step_jaxpr(eng) -> str:
    return str(jax.make_jaxpr(lambda s: eng._generate_fn(eng.params, s, 0, rem=1, chunked=False, beam=False,
                                                         sampled=False))(eng.init_state()))


@pytest.mark.parametrize("family,int8", [("gpt2", False), ("llama", True)])
def test_decode_with_epilogues_matches_xla(family, int8, monkeypatch):
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES[family])
    params = gpt.init_params(cfg, seed=seed % 1000)
    if int8:
        params = Q.quantize_params(params, cfg)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(3, 7))]
    res = {}
    for name, small_m, epi in (("xla", False, False), ("epilogue", True, True)):
        monkeypatch.setattr(linear, "PROJ_EPILOGUE", epi)
        jax.clear_caches()
        llm = ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_batch_size=3, max_seq_len=48)
        llm.engine.small_m = small_m
        if epi:
            txt = _step_jaxpr(llm.engine)
            L = cfg.num_layers
            assert len(re.findall(r"name=_small_linear_epilogue\b", txt)) == 3 * L      # o, MLP in, MLP out
            assert len(re.findall(r"name=_small_linear_parts\b", txt)) == L             # q/k/v
            assert len(re.findall(r"name=add_stats\b", txt)) == 1                       # the embedding's
        res[name] = llm.generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    assert res["epilogue"].tokens == res["xla"].tokens, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(res["epilogue"].output_log_probs, np.float32),
                               np.asarray(res["xla"].output_log_probs, np.float32), atol=2e-4, rtol=1e-4)
