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


def test_add_norm_of_a_sub_block_output_at_prefill_rows():
    """The prefill's use (ftjax.models.gpt.NORM_KERNEL): more rows than a decode step, and the added term a
    sub-block's output in the stream's dtype ([1, M, D] bf16) rather than float32 partials."""
    seed, rng = _rng()
    M, D = 37, 80
    x = jnp.asarray(rng.randn(M, D), jnp.bfloat16)
    y = jnp.asarray(rng.randn(1, M, D), jnp.bfloat16)
    g = jnp.asarray(rng.rand(D) + 0.5, jnp.bfloat16)
    b = jnp.asarray(rng.randn(D), jnp.bfloat16)
    got = add_norm(x, y, gamma=g, beta=b, interpret=True)
    ref = add_norm_reference(x, y, gamma=g, beta=b)
    # the sum is one bf16 rounding of x + y, as XLA's bf16 add
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(x + y[0], np.float32))
    assert _err(got[1], ref[1]) < 0.05, f"seed {seed}"


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


@pytest.mark.parametrize("S,b,kh,s,h,dt,splits,extras", [
    (3, 2, 4, 48, 16, "float32", 2, True),       # partials, scales + biases
    (1, 1, 2, 64, 32, "bfloat16", None, False),  # finished values, nothing else
])
def test_decode_attention_append_packed_source(S, b, kh, s, h, dt, splits, extras):
    """One packed q/k/v projection [S, b, 3k, h] (the engine's packed weights) read at head offsets: the same
    outputs as the three sources sliced from it, and as the float32 reference."""
    seed, rng = _rng()
    qkv = jnp.asarray(rng.randn(S, b, 3 * kh, h), jnp.float32)
    pos = jnp.asarray(rng.randint(0, s, size=b), jnp.int32)
    kc = jnp.asarray(rng.randn(b, kh, s, h), dt)
    vc = jnp.asarray(rng.randn(b, kh, s, h), dt)
    mult = bias = None
    if extras:
        mult = jnp.asarray(rng.rand(3 * kh, h) + .5, jnp.float32)
        bias = jnp.asarray(rng.randn(3 * kh, h), dt)
    thirds = lambda t: None if t is None else (t[:kh], t[kh:2 * kh], t[2 * kh:])  # noqa: E731
    cfg = DecodeConfig(block_k=16, num_splits=splits, min_blocks_per_split=1)
    got = decode_attention_append(qkv, None, None, kc, vc, pos, mult, bias, interpret=True, config=cfg)
    split = decode_attention_append(qkv[:, :, :kh], qkv[:, :, kh:2 * kh], qkv[:, :, 2 * kh:], kc, vc, pos,
                                    thirds(mult), thirds(bias), interpret=True, config=cfg)
    ref = decode_attention_append_reference(qkv, None, None, kc, vc, pos, mult, bias)
    tol = 2e-5 if dt == "float32" else 0.02
    for c in range(3):
        assert got[c].shape == split[c].shape and got[c].dtype == split[c].dtype
        np.testing.assert_array_equal(np.asarray(got[c], np.float32), np.asarray(split[c], np.float32),
                                      err_msg=f"output {c}, seed {seed}")
    assert _err(got[0], ref[0]) < tol * 4, f"seed {seed}"
    for r in range(b):
        p = int(pos[r])
        for c in (1, 2):
            assert _err(got[c][r, :, : p + 1], ref[c][r, :, : p + 1]) <= tol, f"seed {seed}"
    with pytest.raises(AssertionError, match=r"packed q/k/v partials must be \[S, b, 3 \* k, h\]"):
        decode_attention_append(qkv[:, :, 1:], None, None, kc, vc, pos, interpret=True)
    with pytest.raises(AssertionError, match="biases: a packed source takes one"):
        decode_attention_append(qkv, None, None, kc, vc, pos, None, (bias,) * 3 if extras else qkv,
                                interpret=True)


def test_append_rejects_unsupported_shapes():
    q = jnp.zeros((1, 1, 2, 24), jnp.float32)
    kc = jnp.zeros((1, 2, 32, 24), jnp.float32)
    with pytest.raises(AssertionError, match="power-of-two head_dim"):
        decode_attention_append(q, q, q, kc, kc, jnp.zeros((1,), jnp.int32), interpret=True)
