"""The fused decode step's kernels (interpreted on CPU) against their float32 plain-jnp twins on fresh
random inputs: the residual add + norm (`add_norm`), the wide add + row statistics (`add_stats`) with the
projection that normalises its input from them (`small_linear_parts(norm=...)`) and the `normalise`
kernel, and the attention that sums q/k/v partials and writes the new K/V into the cache
(`decode_attention_append`: MHA, GQA, MQA, several splits, int8 scales, biases, positions 0 and s - 1,
cache past the new token poisoned with NaN and left untouched)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.pallas.add_norm import add_norm, add_norm_reference, add_stats, norm_from_stats, normalise
from ftjax.pallas.decode_attention import (DecodeConfig, decode_attention_append,
                                           decode_attention_append_reference)
from ftjax.pallas.small_linear import small_linear_parts, small_linear_reference


def _rng():
    seed = np.random.randint(1 << 30)
    return seed, np.random.RandomState(seed)


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


CASES = [(1, 64, 3, "layernorm", "float32", True), (3, 100, 1, "rmsnorm", "bfloat16", False),
         (2, 48, 0, "layernorm", "float32", False), (16, 136, 5, "layernorm", "bfloat16", True)]


def _inputs(rng, M, D, S, kind, dt, scaled):
    x = jnp.asarray(rng.randn(M, D), dt)
    parts = jnp.asarray(rng.randn(S, M, D), jnp.float32) if S else None
    ps = jnp.asarray(rng.rand(D) + 0.5, jnp.float32) if S and scaled else None
    pb = jnp.asarray(rng.randn(D), dt) if S else None
    g = jnp.asarray(rng.rand(D) + 0.5, dt)
    b = jnp.asarray(rng.randn(D), dt) if kind == "layernorm" else None
    return x, parts, ps, pb, g, b


@pytest.mark.parametrize("M,D,S,kind,dt,scaled", CASES)
def test_add_norm_matches_reference(M, D, S, kind, dt, scaled):
    seed, rng = _rng()
    x, parts, ps, pb, g, b = _inputs(rng, M, D, S, kind, dt, scaled)
    got = add_norm(x, parts, ps, pb, gamma=g, beta=b, kind=kind, interpret=True)
    ref = add_norm_reference(x, parts, ps, pb, gamma=g, beta=b, kind=kind)
    tol = 1e-5 if dt == "float32" else 0.02
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert _err(a, r) < tol * max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32))))), f"seed {seed}"


@pytest.mark.parametrize("M,D,S,kind,dt,scaled", CASES)
def test_add_stats_normalise_and_normalising_projection(M, D, S, kind, dt, scaled):
    seed, rng = _rng()
    x, parts, ps, pb, g, b = _inputs(rng, M, D, S, kind, dt, scaled)
    xn, st = add_stats(x, parts, ps, pb, interpret=True)
    rx, rh = add_norm_reference(x, parts, ps, pb, gamma=g, beta=b, kind=kind)
    tol = 1e-5 if dt == "float32" else 0.02
    assert _err(xn, rx) <= tol * max(1.0, float(jnp.max(jnp.abs(rx.astype(jnp.float32))))), f"seed {seed}"
    assert st.shape[:2] == (2, M)
    np.testing.assert_allclose(np.asarray(st[0].sum(-1)), np.asarray(xn, np.float32).sum(-1), rtol=1e-4, atol=1e-3)
    h = normalise(xn, st, g, b, kind=kind, interpret=True)
    assert _err(h, rh) < 0.03 and _err(h, norm_from_stats(xn, st, g, b, kind=kind)) < 0.03, f"seed {seed}"
    ws = [jnp.asarray(rng.randn(D, n) / np.sqrt(D), dt) for n in (40, 72)]
    got = small_linear_parts(xn, ws, norm=(st, g, b, kind, 1e-5), interpret=True)
    ref = small_linear_reference(rh, ws)
    for p, r in zip(got, ref):
        assert p.ndim == 3 and p.shape[1:] == r.shape
        assert _err(p.sum(0), r) < (2e-4 if dt == "float32" else 0.1), f"seed {seed}"


@pytest.mark.parametrize("S,b,n,kh,s,h,dt,splits,extras", [
    (3, 2, 4, 4, 48, 16, "float32", None, True),       # MHA, partials, scales + biases
    (1, 3, 4, 2, 64, 32, "float32", 2, False),         # GQA, finished values (S = 1)
    (2, 2, 8, 1, 32, 16, "bfloat16", 3, True),         # MQA
    (4, 1, 2, 2, 128, 64, "bfloat16", 4, True),
])
def test_decode_attention_append_matches_reference(S, b, n, kh, s, h, dt, splits, extras):
    seed, rng = _rng()
    q = jnp.asarray(rng.randn(S, b, n, h), jnp.float32)
    k = jnp.asarray(rng.randn(S, b, kh, h), jnp.float32)
    v = jnp.asarray(rng.randn(S, b, kh, h), jnp.float32)
    pos = rng.randint(0, s, size=b)
    pos[0] = 0
    pos[-1] = s - 1 if b > 1 else pos[-1]
    kc = rng.randn(b, kh, s, h).astype(np.float32)
    vc = rng.randn(b, kh, s, h).astype(np.float32)
    for r, p in enumerate(pos):
        kc[r, :, p + 1:] = np.nan
        vc[r, :, p + 1:] = np.nan
    kc, vc = jnp.asarray(kc, dt), jnp.asarray(vc, dt)
    mults = biases = None
    if extras:
        mults = (jnp.asarray(rng.rand(n, h) + .5, jnp.float32), jnp.asarray(rng.rand(kh, h) + .5, jnp.float32),
                 jnp.asarray(rng.rand(kh, h) + .5, jnp.float32))
        biases = (jnp.asarray(rng.randn(n, h), dt), jnp.asarray(rng.randn(kh, h), dt),
                  jnp.asarray(rng.randn(kh, h), dt))
    P = jnp.asarray(pos, jnp.int32)
    ref = decode_attention_append_reference(q, k, v, kc, vc, P, mults, biases)
    got = decode_attention_append(q, k, v, kc, vc, P, mults, biases, interpret=True,
                                  config=DecodeConfig(block_k=16, num_splits=splits, min_blocks_per_split=1))
    tol = 2e-5 if dt == "float32" else 0.02
    assert got[0].shape == (b, n, h) and got[0].dtype == kc.dtype
    assert _err(got[0], ref[0]) < tol * 4, f"seed {seed}"
    for c in (1, 2):
        for r in range(b):
            assert _err(got[c][r, :, : pos[r] + 1], ref[c][r, :, : pos[r] + 1]) <= tol, f"seed {seed}"
            assert np.isnan(np.asarray(got[c][r, :, pos[r] + 1:], np.float32)).all(), f"seed {seed}"
    assert not np.isnan(np.asarray(kc[0, :, : pos[0] + 1], np.float32)).all()   # the caller's cache is intact


def test_append_rejects_unsupported_shapes():
    q = jnp.zeros((1, 1, 2, 24), jnp.float32)
    kc = jnp.zeros((1, 2, 32, 24), jnp.float32)
    with pytest.raises(AssertionError, match="power-of-two head_dim"):
        decode_attention_append(q, q, q, kc, kc, jnp.zeros((1,), jnp.int32), interpret=True)


@pytest.mark.parametrize("M,K,F,N,act,gated,wq,normed,cfg", [
    (1, 64, 256, 64, "gelu_tanh", False, "bf16", True, None),
    (3, 96, 200, 80, "silu", True, "int8", False, dict(block_f=32, block_k=32, block_n=32)),     # ragged F, N, K
    (16, 128, 128, 128, "relu", False, "int8t", True, dict(block_f=16)),
    (2, 48, 64, 48, "gelu_tanh", True, "f32", False, None),
])
def test_fused_mlp_matches_reference(M, K, F, N, act, gated, wq, normed, cfg):
    """`fused_mlp_parts`: the whole MLP in one kernel (hidden slices per program, output partials) against
    the float32 jnp twin of MLP.parts' rounding order, with int8 weights (either layout), gating, the norm
    applied on the fly, ragged tiles."""
    from ftjax.layers.mlp import activation
    from ftjax.pallas.fused_mlp import FusedMLPConfig, fused_mlp_parts

    seed, rng = _rng()
    dt = "float32" if wq == "f32" else "bfloat16"
    x = jnp.asarray(rng.randn(M, K), dt)
    n_in = 2 if gated else 1
    int8 = wq.startswith("int8")
    if int8:
        w_ins = [jnp.asarray(rng.randint(-127, 128, size=(K, F)), jnp.int8) for _ in range(n_in)]
        w_out = jnp.asarray(rng.randint(-127, 128, size=(F, N)), jnp.int8)
        s_in = [jnp.asarray((rng.rand(F) + 0.5) / 127 / np.sqrt(K), jnp.float32) for _ in range(n_in)]
    else:
        w_ins = [jnp.asarray(rng.randn(K, F) / np.sqrt(K), dt) for _ in range(n_in)]
        w_out = jnp.asarray(rng.randn(F, N) / np.sqrt(F), dt)
        s_in = [None] * n_in
    b_in = [jnp.asarray(rng.randn(F) * 0.1, dt), None][:n_in]
    norm = None
    xin = x
    if normed:
        g = jnp.asarray(rng.rand(K) + 0.5, dt)
        be = jnp.asarray(rng.randn(K) * 0.1, dt)
        xn, st = add_stats(x, interpret=True)
        norm = (st, g, be, "layernorm", 1e-5)
        xin = norm_from_stats(xn, st, g, be, kind="layernorm")
        x = xn
    ys = []
    for w, s, b in zip(w_ins, s_in, b_in):
        y = small_linear_reference(xin, [w])[0]
        y = y * (1.0 if s is None else s) + (0.0 if b is None else b.astype(jnp.float32))
        ys.append(y.astype(dt).astype(jnp.float32))
    h = (activation(act, ys[1]) * ys[0] if gated else activation(act, ys[0])).astype(dt)
    ref = small_linear_reference(h, [w_out])[0]
    t = wq == "int8t"
    got = fused_mlp_parts(x, [w.T for w in w_ins] if t else w_ins, w_out.T if t else w_out, act=act,
                          scales_in=s_in, biases_in=b_in, trans_in=[t] * n_in, trans_out=t, norm=norm,
                          config=FusedMLPConfig(**cfg) if cfg else None, interpret=True)
    assert got.ndim == 3 and got.shape[1:] == (M, N)
    mag = float(jnp.max(jnp.abs(h.astype(jnp.float32)) @ jnp.abs(w_out.astype(jnp.float32))))
    tol = 1e-5 if dt == "float32" else 0.02
    assert _err(got.sum(0), ref) <= tol * mag, f"seed {seed}: err {_err(got.sum(0), ref)} mag {mag}"
