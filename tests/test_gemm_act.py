"""The prefill GEMM with bias and activation in its epilogue (ftjax/pallas/gemm_act.py, interpreted on CPU)
against its float32 twin on fresh random inputs; the MLP with it switched on (mlp.GELU_GEMM) against the MLP
without; its Triton lowering for CUDA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.pallas.gemm_act import GemmConfig, linear_act, linear_act_reference

SMALL = GemmConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2, group_m=2)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@pytest.mark.parametrize("M,K,N,act,dtype,bias", [
    (40, 64, 96, "gelu_tanh", jnp.bfloat16, True),     # M padded to the row tile; 3 row x 3 column tiles
    (16, 32, 64, "gelu", jnp.float32, True),
    (70, 48, 32, "relu", jnp.float16, False),
    (33, 16, 128, "none", jnp.float32, True),
])
def test_linear_act_matches_reference(M, K, N, act, dtype, bias):
    seed = np.random.randint(1 << 30)
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (M, K), dtype)
    w = (jax.random.normal(ks[1], (K, N), jnp.float32) * K ** -0.5).astype(dtype)
    b = jax.random.normal(ks[2], (N,), dtype) if bias else None
    out = linear_act(x, w, b, activation=act, config=SMALL, interpret=True)
    ref = linear_act_reference(x, w, b, activation=act)
    assert out.shape == (M, N) and out.dtype == dtype
    o, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(o).all()
    err = np.linalg.norm(o - r) / np.linalg.norm(r)
    assert err <= TOL[dtype], f"rel err {err:.2e}, seed {seed}"


def test_tiles_cover_every_output_once():
    """The grouped 1-D grid maps the programs onto every (row tile, column tile) exactly once."""
    from ftjax.pallas.gemm_act import _tile
    for num_m, num_n, g in [(5, 3, 2), (8, 4, 8), (1, 7, 8), (9, 2, 4)]:
        seen = {tuple(int(v) for v in _tile(jnp.int32(i), num_m, num_n, g)) for i in range(num_m * num_n)}
        assert seen == {(m, n) for m in range(num_m) for n in range(num_n)}, (num_m, num_n, g)


def test_bad_shapes_name_the_sizes():
    x = jnp.zeros((16, 48), jnp.float32)
    with pytest.raises(AssertionError, match="K=48"):
        linear_act(x, jnp.zeros((48, 64), jnp.float32), config=SMALL.__class__(block_k=32), interpret=True)
    with pytest.raises(AssertionError, match="K=48 columns but w has 32"):
        linear_act(x, jnp.zeros((32, 64), jnp.float32), interpret=True)
    with pytest.raises(AssertionError, match="activation"):
        linear_act(x, jnp.zeros((48, 64), jnp.float32), activation="swish", config=SMALL, interpret=True)


def test_mlp_prefill_with_gemm_act_matches_without(monkeypatch):
    """mlp.GELU_GEMM on (threshold lowered to this prefill's 27 rows): GPT's bf16 prefill runs the MLP-in
    projection as `linear_act` in every layer, and its logits and K/V stay within bf16 rounding of the cuBLAS +
    separate-GELU path's (which rounds the product to bf16 before the activation; the kernel does not)."""
    from ftjax.config import ModelConfig
    from ftjax.layers import mlp
    from ftjax.models import gpt

    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=256,
                      bos_id=0, eos_id=1)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), gpt.init_params(cfg, seed=seed % 1000))
    model = gpt.build(cfg, dtype=jnp.bfloat16, impl="pallas")
    tokens = jnp.asarray(np.random.RandomState(seed % 997).randint(2, 300, size=(3, 9)), jnp.int32)
    lengths = jnp.asarray([9, 5, 2], jnp.int32)

    from ftjax.pallas import gemm_act

    calls = []
    real = gemm_act.linear_act

    def counted(x, w, *a, **k):
        calls.append((x.shape, w.shape))
        return real(x, w, *a, **k)

    monkeypatch.setattr(gemm_act, "linear_act", counted)

    def run():
        calls.clear()
        jax.clear_caches()
        return jax.jit(lambda p: model.apply({"params": p}, tokens, lengths, method=gpt.GPT.prefill))(params)

    monkeypatch.setattr(mlp, "GELU_GEMM_MIN_ROWS", 16)
    ref_logits, ref_kv = run()
    assert not calls
    monkeypatch.setattr(mlp, "GELU_GEMM", True)
    logits, kv = run()
    assert calls == [((27, 64), (64, 256))] * cfg.num_layers, calls
    lo, lr = np.asarray(logits, np.float32), np.asarray(ref_logits, np.float32)
    err = np.linalg.norm(lo - lr) / np.linalg.norm(lr)
    assert err < 2e-2, f"logits rel err {err:.2e}, seed {seed}"
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        for a, b in ((k, rk), (v, rv)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, f"seed {seed}"
