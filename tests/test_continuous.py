"""LLM.generate with more rows than slots runs continuously (a finished request's slots take the next one at
once): greedy rows against HF transformers with per-prompt max_new_tokens and end ids that stop rows early;
sampled, penalised, stop-word and beam requests against the same requests decoded alone."""
import numpy as np
import pytest

import ftjax
from ftjax.checkpoint.hf import load_gpt2
from tests.conftest import assert_greedy_match, hf_greedy, random_prompts


def _llm(path, slots):
    cfg, params = load_gpt2(path)
    return ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=slots, max_seq_len=64)


def test_continuous_greedy_against_hf_with_early_ends(gpt2_dir):
    path, model = gpt2_dir
    rng = np.random.RandomState(21)
    prompts = random_prompts(rng, 7, 2, 14)
    max_new = [int(x) for x in rng.randint(2, 10, size=7)]
    # an end id taken from each odd prompt's own greedy continuation, so that row stops early and frees its slot
    end_ids = []
    for i, p in enumerate(prompts):
        free, _ = hf_greedy(model, p, max_new[i], eos=None)
        end_ids.append(free[1] if i % 2 and len(free) > 2 else None)
    llm = _llm(path, 2)
    seen = []
    res = llm.generate(prompts, max_new_tokens=max_new, end_id=end_ids, progress=lambda d, t: seen.append((d, t)))
    for i, p in enumerate(prompts):
        ref, ref_logits = hf_greedy(model, p, max_new[i], eos=end_ids[i])
        assert_greedy_match(res.tokens[i], ref, ref_logits)
        assert res.sequence_lengths[i] == len(res.tokens[i]) <= max_new[i]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (7, sum(res.sequence_lengths))


def test_continuous_mixed_requests_equal_alone(gpt2_dir):
    path, _ = gpt2_dir
    rng = np.random.RandomState(5)
    prompts = random_prompts(rng, 8, 1, 12)
    params = [ftjax.SamplingParams(top_k=5, random_seed=11, return_log_probs=True),
              ftjax.SamplingParams(beam_width=2, len_penalty=0.8),
              ftjax.SamplingParams(top_p=0.8, temperature=0.7, random_seed=3, repetition_penalty=1.3),
              ftjax.SamplingParams(end_id=None, return_log_probs=True),
              ftjax.SamplingParams(beam_width=3),
              ftjax.SamplingParams(top_k=3, random_seed=7, stop_words=[[prompts[5][-1]]], presence_penalty=0.5),
              ftjax.SamplingParams(min_length=4, top_k=8, random_seed=1),
              ftjax.SamplingParams(top_k=2, random_seed=2**40)]
    max_new = [int(x) for x in rng.randint(1, 9, size=8)]
    llm = _llm(path, 3)
    res = llm.generate(prompts, max_new_tokens=max_new, params=params)
    alone = _llm(path, 3)
    for i, p in enumerate(prompts):
        one = alone.generate([p], max_new_tokens=max_new[i], params=[params[i]])
        assert res.tokens[i] == one.tokens[0], i
        assert res.beams[i] == (one.beams[0] if one.beams is not None else [one.tokens[0]]), i
        if params[i].return_log_probs:
            np.testing.assert_allclose(res.output_log_probs[i], one.output_log_probs[0], atol=1e-5)
    assert sum(p.return_log_probs for p in params) == 2 and len(res.output_log_probs) == 8


def test_max_new_tokens_per_prompt_checked():
    llm = ftjax.load(None, dtype="float32", max_batch_size=2, max_seq_len=32, attention="xla")
    with pytest.raises(ValueError, match="max_new_tokens: 1 values for 2 prompts"):
        llm.generate([[1, 2], [3]], max_new_tokens=[3])
    with pytest.raises(ValueError, match="max_new_tokens: must be positive integers, got 0"):
        llm.generate([[1, 2], [3]], max_new_tokens=[3, 0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate([[1, 2], [3]], max_new_tokens=[3, 40])   # past max_seq_len
    res = llm.generate([[1, 2], [3], [4, 5, 6]], max_new_tokens=[3, 1, 5], end_id=None)
    assert res.sequence_lengths == [3, 1, 5]


def test_continuous_t5_equal_alone(tmp_path):
    """The encoder-decoder path: more prompts than slots, each as decoded alone (which test_t5.py checks
    against HF)."""
    from tests.test_t5 import make_hf_t5

    make_hf_t5(str(tmp_path))
    rng = np.random.RandomState(3)
    llm = ftjax.load(str(tmp_path), dtype="float32", max_batch_size=2, max_seq_len=32, attention="xla")
    prompts = [rng.randint(1, llm.cfg.vocab, size=rng.randint(2, 9)).tolist() for _ in range(5)]
    max_new = [int(x) for x in rng.randint(1, 8, size=5)]
    res = llm.generate(prompts, max_new_tokens=max_new, top_k=[0, 3, 0, 5, 0], random_seed=[0, 1, 2, 3, 4])
    for i, p in enumerate(prompts):
        one = llm.generate([p], max_new_tokens=max_new[i], top_k=[0, 3, 0, 5, 0][i], random_seed=i)
        assert res.tokens[i] == one.tokens[0], i
