"""The prefill's packed q/k/v (ftjax/layers/attention.py, PACKED_QKV, on by default; set both ways here): with the Pallas attention
(interpreted on CPU) and no rotary embedding, q, k and v are one projection whose output the attention kernel reads
in place. Held to the three projections as written (PACKED_QKV off): the same prefill logits and K/V, for float32
and int8 weights in both layouts, multi-head and grouped-query; and GPT-2's greedy tokens to Hugging Face's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import quantize as Q
from ftjax.checkpoint.hf import load_gpt2
from ftjax.config import ModelConfig
from ftjax.layers import attention as A
from ftjax.models import gpt
from ftjax.pallas import ops
from tests.conftest import assert_greedy_match, hf_greedy, random_prompts


@pytest.mark.parametrize("weights,kv_heads", [("float", 4), ("float", 2), ("int8", 2), ("int8t", 4)])
def test_packed_prefill_matches_split_projections(monkeypatch, weights, kv_heads):
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                      ffn_dim=96, bos_id=0, eos_id=1)
    params = gpt.init_params(cfg, seed=seed % 1000)
    if weights != "float":
        params = Q.quantize_params(params, cfg, transposed=weights == "int8t")
    model = gpt.build(cfg, impl="pallas")
    rng = np.random.RandomState(seed % 997)
    tokens = jnp.asarray(rng.randint(2, 300, size=(3, 9)), jnp.int32)
    lengths = jnp.asarray([9, 4, 1], jnp.int32)
    calls = []
    real = ops.attention_prefill_packed

    def counted(qkv, n, kh, *a, **k):
        calls.append(qkv.shape)
        return real(qkv, n, kh, *a, **k)

    monkeypatch.setattr(ops, "attention_prefill_packed", counted)
    monkeypatch.setattr(A, "PACKED_QKV", True)
    run = jax.jit(lambda p: model.apply({"params": p}, tokens, lengths, method=gpt.GPT.prefill))
    logits, kv = run(params)
    assert calls == [(3, 9, 4 + 2 * kv_heads, 16)] * cfg.num_layers, calls
    monkeypatch.setattr(A, "PACKED_QKV", False)
    calls.clear()
    ref_logits, ref_kv = jax.jit(lambda p: model.apply({"params": p}, tokens, lengths, method=gpt.GPT.prefill))(params)
    assert not calls
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        assert k.shape == rk.shape == (3, 9, kv_heads, 16)
        np.testing.assert_allclose(np.asarray(k), np.asarray(rk), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v), np.asarray(rv), rtol=1e-4, atol=1e-5)


def test_gpt2_pallas_greedy_matches_hf(gpt2_dir, monkeypatch):
    """End to end through the engine (prefill on the packed path, decode on the Pallas kernels): HF's tokens."""
    monkeypatch.setattr(A, "PACKED_QKV", True)
    path, model = gpt2_dir
    cfg, params = load_gpt2(path)
    llm = ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_batch_size=3, max_seq_len=40)
    prompts = random_prompts(np.random.RandomState(17), 3, 2, 15)
    res = llm.generate(prompts, max_new_tokens=4, end_id=None)
    for p, toks in zip(prompts, res.tokens):
        ref, ref_logits = hf_greedy(model, p, 4)
        assert_greedy_match(toks, ref, ref_logits)
