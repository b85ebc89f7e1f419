"""The engine's packed q/k/v params (`attention.pack_qkv`, on by default for one device per shard) against the
same engine with q, k and v kept apart (`engine.PACK_QKV = False`), on fresh random weights: the same greedy
tokens and log probs through XLA's attention, the Pallas kernels (interpreted) with the small-M kernel on the
unfused and the fused decode step (the attention kernel reading q/k/v at head offsets), GPT-2-like and LLaMA-like
(rotary, grouped query heads), float and INT8 weights; pack / unpack round trips; the layer kernel unpacks."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import ftjax
from ftjax import engine as E
from ftjax import quantize as Q
from ftjax.config import ModelConfig
from ftjax.layers import attention as A
from ftjax.models import gpt

SHAPES = {
    "gpt2": dict(),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
    "mqa": dict(num_kv_heads=1),   # learned positions, grouped query heads: the fused step splits the partials
}


def _cfg(family):
    return ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                       bos_id=0, eos_id=1, **SHAPES[family])


def _run(cfg, params, pack, attention, small_m, fuse, monkeypatch, prompts):
    monkeypatch.setattr(E, "PACK_QKV", pack)
    llm = ftjax.LLM(cfg, params, dtype="float32", attention=attention, max_batch_size=3, max_seq_len=48)
    if small_m is not None:
        llm.engine.small_m = small_m
        llm.engine.fuse_decode = fuse
    assert llm.engine._qkv_packed == pack
    names = {str(getattr(k, "key", "")) for p, _ in jax.tree_util.tree_flatten_with_path(llm.engine.params)[0]
             for k in p}
    assert ("qkv" in names) == pack and ("q" in names) != pack
    res = llm.generate(prompts, max_new_tokens=6, end_id=None, return_log_probs=True)
    return res.tokens, np.array(res.output_log_probs), llm


@pytest.mark.parametrize("family,int8,attention,small_m,fuse", [
    ("gpt2", False, "xla", None, None),
    ("gpt2", False, "pallas", True, True),      # fused: packed partials read at head offsets
    ("gpt2", True, "pallas", True, True),       # int8 (transposed): packed scales too
    ("llama", False, "pallas", True, True),     # rotary: q and k finished in XLA
    ("llama", True, "pallas", True, False),     # unfused small-M step
    ("mqa", False, "pallas", True, True),       # grouped query heads, learned positions
])
def test_packed_engine_matches_unpacked(family, int8, attention, small_m, fuse, monkeypatch):
    seed = np.random.randint(1 << 30)
    cfg = _cfg(family)
    params = gpt.init_params(cfg, seed=seed % 1000)
    if int8:
        params = Q.quantize_params(params, cfg)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(3, 9))]
    t0, lp0, _ = _run(cfg, params, False, attention, small_m, fuse, monkeypatch, prompts)
    t1, lp1, llm = _run(cfg, params, True, attention, small_m, fuse, monkeypatch, prompts)
    assert t1 == t0, f"seed {seed}"
    np.testing.assert_allclose(lp1, lp0, atol=1e-4, err_msg=f"seed {seed}")
    # the full logits of the packed prefill against the unpacked model applied directly
    ids = [prompts[0][:7]]
    ref = np.asarray(gpt.build(cfg, impl="xla").apply({"params": jax.tree.map(np.asarray, params)},
                                                      np.asarray(ids, np.int32), np.asarray([7], np.int32), True,
                                                      method=gpt.GPT.prefill)[0])
    np.testing.assert_allclose(llm.logits(ids)[0, :7], ref[0, :7], atol=2e-3, rtol=1e-3, err_msg=f"seed {seed}")


@pytest.mark.parametrize("int8", [None, "kn", "nk"])
def test_pack_unpack_round_trip(int8):
    cfg = _cfg("mqa")
    params = jax.tree.map(np.asarray, gpt.init_params(cfg, seed=3))
    if int8:
        params = Q.quantize_params(params, cfg, transposed=int8 == "nk")
    packed = A.pack_qkv(params)
    attn = packed["layers_0"]["attn"]
    assert set(attn) == {"qkv", "o"} and set(attn["qkv"]) == {"kernel", "bias"}
    w = attn["qkv"]["kernel"]
    assert w.shape == (64, 4 + 2 * 1, 16)
    leaves = jax.tree.leaves(packed)
    assert all(isinstance(x, np.ndarray) for x in leaves)   # host arrays stay on the host
    back = A.unpack_qkv(packed, cfg.num_heads, cfg.kv_heads)
    ok = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b)),
                      back, params)
    assert all(jax.tree.leaves(ok))
    assert A.pack_qkv(packed) is not None and set(A.pack_qkv(packed)["layers_1"]["attn"]) == {"qkv", "o"}
    if int8:   # a block whose q, k, v are of different kinds stays apart
        mixed = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, (Q.QuantizedWeight, Q.QuantizedWeightT)))
        mixed["layers_0"]["attn"]["k"] = {**mixed["layers_0"]["attn"]["k"], "kernel": np.zeros((64, 1, 16), np.float32)}
        out = A.pack_qkv(mixed)
        assert set(out["layers_0"]["attn"]) == {"q", "k", "v", "o"} and set(out["layers_1"]["attn"]) == {"qkv", "o"}


def test_layer_kernel_unpacks(monkeypatch):
    """fuse_decode = "layer" (the layer kernel takes q, k, v as three weights) splits a packed engine's params."""
    cfg = _cfg("gpt2")
    params = gpt.init_params(cfg, seed=5)
    monkeypatch.setattr(E, "PACK_QKV", True)
    llm = ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=2, max_seq_len=32)
    assert llm.engine._qkv_packed
    before = llm.generate([[5, 6, 7]], max_new_tokens=4, end_id=None).tokens
    llm.engine.fuse_decode = "layer"
    assert not llm.engine._qkv_packed and set(llm.engine.params["layers_0"]["attn"]) == {"q", "k", "v", "o"}
    assert llm.generate([[5, 6, 7]], max_new_tokens=4, end_id=None).tokens == before
