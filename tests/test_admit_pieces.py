"""The admit cut into calls along the layers (`engine.ADMIT_PIECES`) against the one-call admit: the same state
after `prefill_insert` (caches, sequences, log probs, per-slot fields) and the same tokens and log probs of whole
requests, on fresh random weights: XLA's attention, the Pallas kernels interpreted (with the prefill writing the
K/V into the cache and without), the add + norm kernel's (x, y) residual stream carried across the cut, a
non-contiguous admit into a state that already holds a request, and sampled rows."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import ftjax
from ftjax import engine as E
from ftjax.config import ModelConfig
from ftjax.models import gpt


def _llm(cfg, params, pieces, attention, monkeypatch, writes=False, norm_kernel=False):
    monkeypatch.setattr(E, "ADMIT_PIECES", pieces)
    monkeypatch.setattr(E, "PREFILL_WRITES_KV", writes)
    monkeypatch.setattr(E, "INSERT_IN_PLACE_MIN_TOKENS", 0)     # the multi-request admit below is contiguous
    if norm_kernel:
        monkeypatch.setattr(gpt, "NORM_KERNEL_MIN_ROWS", 0)
    llm = ftjax.LLM(cfg, params, dtype="float32", attention=attention, max_batch_size=4, max_seq_len=48)
    if pieces > 1:
        assert llm.engine._pieces is not None and len(llm.engine._pieces) == min(pieces, cfg.num_layers)
    else:
        assert llm.engine._pieces is None
    return llm


def _run(llm, prompts):
    eng = llm.engine
    st = eng.init_state()
    st = eng.prefill_insert(st, [[5, 6, 7, 8]], [3], [5], llm.sampling_params(1, end_id=None))   # slot 3 taken
    # non-contiguous: two requests into slots 2 and 0; one sampled, with its own seed
    st = eng.prefill_insert(st, prompts[:2], [2, 0], [6, 6],
                            llm.sampling_params(2, end_id=None, top_k=[1, 5], random_seed=[0, 11]))
    state = jax.tree.map(np.asarray, st)
    res = llm.generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    return state, res.tokens, np.asarray(res.output_log_probs)


@pytest.mark.parametrize("pieces,attention,writes,norm_kernel", [
    (2, "xla", False, False), (3, "pallas", False, False), (2, "pallas", True, False), (3, "pallas", False, True)])
def test_admit_in_pieces_matches_one_call(pieces, attention, writes, norm_kernel, monkeypatch):
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=257, max_positions=48, hidden=32, num_layers=3, num_heads=4, ffn_dim=64,
                      bos_id=0, eos_id=1)
    params = gpt.init_params(cfg, seed=seed % 1000)
    rng = np.random.RandomState(seed % 997)
    prompts = [list(rng.randint(2, 257, size=n)) for n in (9, 4, 13)]
    out = {}
    for p in (1, pieces):
        llm = _llm(cfg, params, p, attention, monkeypatch, writes, norm_kernel)
        out[p] = _run(llm, prompts)
    (s1, t1, lp1), (sp, tp, lpp) = out[1], out[pieces]
    flat1, tree1 = jax.tree_util.tree_flatten_with_path(s1)
    flatp, treep = jax.tree_util.tree_flatten_with_path(sp)
    assert tree1 == treep
    for (path, a), (_, b) in zip(flat1, flatp):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed} {jax.tree_util.keystr(path)}")
    assert tp == t1, f"seed {seed}"
    np.testing.assert_allclose(lpp, lp1, atol=1e-5, err_msg=f"seed {seed}")


def test_pieces_need_a_decoder_only_family(monkeypatch):
    """T5 (encoder-decoder) keeps the one-call admit; more pieces than layers become one a layer."""
    monkeypatch.setattr(E, "ADMIT_PIECES", 8)
    from ftjax.config import T5Config
    from ftjax.models import t5 as T5
    tc = T5Config(vocab_size=64, hidden=16, head_dim=4, ffn_dim=32, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2)
    assert ftjax.LLM(tc, T5.init_params(tc), dtype="float32", attention="xla", max_batch_size=2,
                     max_seq_len=16).engine._pieces is None
    cfg = ModelConfig(vocab_size=64, max_positions=16, hidden=16, num_layers=3, num_heads=2, ffn_dim=32)
    eng = ftjax.LLM(cfg, gpt.init_params(cfg, seed=0), dtype="float32", max_batch_size=2, max_seq_len=16).engine
    assert eng._pieces == ((0, 1), (1, 2), (2, 3))
