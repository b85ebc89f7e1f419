"""Decoding controls through the engine, against HF transformers where the semantics coincide."""
import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint.hf import load_gpt2
from tests.conftest import VOCAB, assert_greedy_match, random_prompts

EOS = VOCAB - 1


@pytest.fixture(scope="module")
def pair(gpt2_dir):
    path, model = gpt2_dir
    cfg, params = load_gpt2(path)
    return ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=8, max_seq_len=64), model


def _hf(model, prompt, max_new, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                             eos_token_id=kw.pop("eos", None), output_logits=True, output_scores=True,
                             return_dict_in_generate=True, **kw)
    return out


def _greedy_ref(model, prompt, max_new, **kw):
    out = _hf(model, prompt, max_new, **kw)
    toks = out.sequences[0, len(prompt):].tolist()
    scores = torch.stack(out.scores, 1)[0].numpy()   # processed logits: near-ties judged on these
    return toks, scores, out


@pytest.mark.parametrize("kw,hf_kw", [
    (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
    (dict(repetition_penalty=0.6), dict(repetition_penalty=0.6)),
    (dict(min_length=5, end_id=EOS), dict(min_new_tokens=5, eos=EOS)),
    (dict(top_k=1), dict()),
    (dict(temperature=0.0, top_k=5), dict()),
])
def test_greedy_with_processors_matches_hf(pair, kw, hf_kw):
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(21), 5, 2, 14)
    res = llm.generate(prompts, max_new_tokens=10, **({"end_id": None} | kw))
    for p, toks in zip(prompts, res.tokens):
        ref, scores, _ = _greedy_ref(model, p, 10, **hf_kw)
        assert_greedy_match(toks, ref, scores)


def test_min_length_suppresses_end_id(pair):
    llm, model = pair
    p = random_prompts(np.random.RandomState(3), 1, 4, 4)[0]
    free = llm.generate([p], max_new_tokens=8, end_id=None).tokens[0]
    end = free[1]  # the model's 2nd greedy token becomes end_id
    assert llm.generate([p], max_new_tokens=8, end_id=end).tokens[0] == free[: free.index(end) + 1]
    held = llm.generate([p], max_new_tokens=8, end_id=end, min_length=4).tokens[0]
    assert end not in held[:4]
    ref, scores, _ = _greedy_ref(model, p, 8, eos=end, min_new_tokens=4)
    assert_greedy_match(held, ref, scores)


def test_bad_words_match_hf(pair):
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(8), 4, 3, 10)
    free = llm.generate(prompts, max_new_tokens=8, end_id=None)
    # ban each row's own favourite continuations: single tokens and a two-token sequence
    bad = sorted({free.tokens[0][0], free.tokens[1][0]})
    bad_words = [[b] for b in bad] + [free.tokens[2][:2]]
    res = llm.generate(prompts, max_new_tokens=8, end_id=None, bad_words=bad_words)
    for p, toks in zip(prompts, res.tokens):
        ref, scores, _ = _greedy_ref(model, p, 8, bad_words_ids=bad_words)
        assert_greedy_match(toks, ref, scores)
        assert not set(bad) & set(toks)
    # FT's [2, L] encoding gives the same result
    flat = [t for w in bad_words for t in w]
    offs = np.cumsum([len(w) for w in bad_words]).tolist()
    enc = np.full((2, len(flat)), -1, np.int32)
    enc[0, : len(flat)] = flat
    enc[1, : len(offs)] = offs
    assert llm.generate(prompts, max_new_tokens=8, end_id=None, bad_words=enc).tokens == res.tokens


def test_stop_words_end_right_after(pair):
    llm, _ = pair
    prompts = random_prompts(np.random.RandomState(4), 3, 3, 8)
    free = llm.generate(prompts, max_new_tokens=12, end_id=None).tokens
    stop = free[0][3:5]   # a two-token sequence the first row will generate
    res = llm.generate(prompts, max_new_tokens=12, end_id=None, stop_words=[stop])
    for f, toks in zip(free, res.tokens):
        cut = next((j + 2 for j in range(len(f) - 1) if f[j:j + 2] == stop), len(f))
        assert toks == f[:cut]
    assert res.tokens[0] == free[0][:5]


@pytest.mark.parametrize("len_penalty", [1.0, 0.3, 2.0])
def test_beam_search_matches_hf_in_a_mixed_batch(pair, len_penalty):
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(31), 4, 2, 9)
    widths = [3, 1, 2, 2]
    res = llm.generate(prompts, max_new_tokens=7, end_id=EOS, beam_width=widths, len_penalty=len_penalty,
                       return_log_probs=True)
    for i, (p, w) in enumerate(zip(prompts, widths)):
        if w == 1:
            ref, scores, _ = _greedy_ref(model, p, 7, eos=EOS)
            assert_greedy_match(res.tokens[i], ref, scores)
            continue
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), num_beams=w, num_return_sequences=w, max_new_tokens=7,
                                 do_sample=False, eos_token_id=EOS, pad_token_id=0, length_penalty=len_penalty,
                                 output_scores=True, return_dict_in_generate=True)
        hyps = []
        for s in out.sequences:
            t = s[len(p):].tolist()
            hyps.append(t[: t.index(EOS) + 1] if EOS in t else t)
        assert res.beams[i] == hyps
        assert res.tokens[i] == hyps[0]
        trans = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        ref_lp = trans[0, : len(hyps[0])].numpy()
        np.testing.assert_allclose(res.output_log_probs[i], ref_lp, atol=2e-4)


def test_log_probs_match_hf_transition_scores(pair):
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(12), 3, 2, 10)
    res = llm.generate(prompts, max_new_tokens=6, end_id=None, return_log_probs=True, repetition_penalty=1.3)
    for p, toks, lps, cum in zip(prompts, res.tokens, res.output_log_probs, res.cum_log_probs):
        ref, scores, out = _greedy_ref(model, p, 6, repetition_penalty=1.3)
        if toks != ref:
            continue  # a near-tie took another path (checked in the greedy tests)
        trans = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].numpy()
        np.testing.assert_allclose(lps, trans, atol=2e-4)
        assert abs(cum - float(np.sum(trans))) < 1e-3
    assert llm.generate(prompts, max_new_tokens=3).cum_log_probs is None


def test_seed_reproducible_across_batch_positions_and_composition(pair):
    llm, _ = pair
    rng = np.random.RandomState(5)
    prompts = random_prompts(rng, 6, 2, 9)
    kw = dict(top_k=20, top_p=0.9, temperature=1.3, end_id=None)
    alone = [llm.generate([p], max_new_tokens=8, random_seed=100 + i, **kw).tokens[0] for i, p in enumerate(prompts[:3])]
    # same requests at other positions, in a batch mixed with greedy, penalised and beam rows
    order = [2, 0, 1]
    mixed_prompts = [prompts[5], prompts[order[0]], prompts[4], prompts[order[1]], prompts[order[2]]]
    params = [ftjax.SamplingParams(end_id=None),
              ftjax.SamplingParams(random_seed=100 + order[0], top_k=20, top_p=0.9, temperature=1.3, end_id=None),
              ftjax.SamplingParams(beam_width=2, end_id=None),
              ftjax.SamplingParams(random_seed=100 + order[1], top_k=20, top_p=0.9, temperature=1.3, end_id=None),
              ftjax.SamplingParams(random_seed=100 + order[2], top_k=20, top_p=0.9, temperature=1.3, end_id=None)]
    mixed = llm.generate(mixed_prompts, max_new_tokens=8, params=params).tokens
    assert [mixed[1], mixed[3], mixed[4]] == [alone[o] for o in order]
    other = llm.generate([prompts[0]], max_new_tokens=8, random_seed=999, **kw).tokens[0]
    samples = {tuple(llm.generate([prompts[0]], max_new_tokens=8, random_seed=s, **kw).tokens[0]) for s in range(4)}
    assert len(samples | {tuple(other)}) > 1  # different seeds do sample differently


def test_changing_values_never_recompiles(pair):
    llm, _ = pair
    prompts = random_prompts(np.random.RandomState(6), 4, 2, 9)
    # (the decode loop compiles per step count mod 16: both calls ask the same count; and once per feature a
    # live slot needs — beam search, a sampling draw, a penalty / word list — which the first call has too)
    llm.generate(prompts, max_new_tokens=9, beam_width=[1, 2, 1, 1], top_k=[0, 0, 5, 0],
                 repetition_penalty=[1.0, 1.0, 1.0, 1.1], end_id=None)
    eng = llm.engine
    sizes = (eng._admit._cache_size(), eng._generate._cache_size())
    llm.generate(prompts, max_new_tokens=9, beam_width=[2, 1, 3, 1], top_k=[3, 0, 0, 40], top_p=[0, 0.5, 0, 0.8],
                 temperature=[1.0, 0.7, 1.0, 1.5], repetition_penalty=[1.0, 1.2, 1.0, 0.9],
                 presence_penalty=[0.0, 0.5, 0.0, 0.0], min_length=[0, 2, 0, 1], random_seed=[1, 2, 3, 4],
                 stop_words=[[7, 8]], bad_words=[[9]], len_penalty=0.5)
    assert (eng._admit._cache_size(), eng._generate._cache_size()) == sizes


@pytest.mark.parametrize("kw,field", [
    (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=VOCAB + 1), "top_k"), (dict(temperature=-1.0), "temperature"), (dict(beam_width=0), "beam_width"),
    (dict(beam_width=9), "beam_width"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(bad_words=[[1, VOCAB]]), "bad_words"), (dict(stop_words=[["a"]]), "stop_words"),
    (dict(end_id=VOCAB), "end_id"), (dict(top_k=[1, 2]), "top_k"), (dict(nucleus=0.5), "nucleus"),
    (dict(min_length=2**31), "min_length"),   # an int32 on the device: refused by name, not an OverflowError
    (dict(beam_search_diversity_rate=1e30), "beam_search_diversity_rate"), (dict(len_penalty=-1e5), "len_penalty"),
])
def test_bad_decoding_values_are_refused(pair, kw, field):
    llm, _ = pair
    with pytest.raises(ValueError, match=field):
        llm.generate([[1, 2, 3]], max_new_tokens=3, **kw)


def _hf_beams(model, p, w, max_new, eos, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([p]), num_beams=w, num_return_sequences=w, max_new_tokens=max_new,
                             do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, **kw)
    ends = eos if isinstance(eos, list) else [eos]
    hyps = []
    for s in out.sequences:
        t = s[len(p):].tolist()
        cut = next((j + 1 for j, x in enumerate(t) if x in ends), len(t))
        hyps.append(t[:cut])
    return hyps


def test_beam_search_ends_at_stop_words_as_hf_at_extra_eos(pair):
    """A single-token stop word finishes a beam hypothesis (the word kept), as HF's beam search does with that
    token as a second eos id; a beam request without it is not cut."""
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(41), 3, 2, 9)
    checked = 0
    for p in prompts:
        free = _hf_beams(model, p, 3, 7, EOS)
        stop = next((t for t in free[0][1:4] if t != EOS), None)   # a token the best beam would produce
        if stop is None:
            continue
        ref = _hf_beams(model, p, 3, 7, [EOS, stop])
        res = llm.generate([p], max_new_tokens=7, end_id=EOS, beam_width=3, stop_words=[[stop]])
        assert res.beams[0] == ref, (p, stop)
        assert llm.generate([p], max_new_tokens=7, end_id=EOS, beam_width=3).beams[0] == free
        checked += 1
    assert checked >= 2


def test_beam_search_applies_temperature(pair):
    """FT divides the logits by the temperature before beam search's softmax: HF with a processor that turns
    its log-softmax scores into log_softmax(logits / T) is the reference."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Tempered(LogitsProcessor):
        def __init__(self, t):
            self.t = t

        def __call__(self, input_ids, scores):
            return torch.log_softmax(scores / self.t, dim=-1)

    llm, model = pair
    prompts = random_prompts(np.random.RandomState(43), 2, 3, 8)
    for p in prompts:
        for t in (0.3, 3.0):
            ref = _hf_beams(model, p, 2, 6, EOS, logits_processor=LogitsProcessorList([Tempered(t)]))
            res = llm.generate([p], max_new_tokens=6, end_id=EOS, beam_width=2, temperature=t,
                               return_log_probs=True)
            assert res.beams[0] == ref, (p, t)
            # the reported log probs are the tempered distribution's
            logits = model(torch.tensor([p + res.tokens[0][:1]])).logits[0].detach().float()
            want = torch.log_softmax(logits[len(p) - 1] / t, -1)[res.tokens[0][0]].item()
            assert abs(res.output_log_probs[0][0] - want) < 2e-4


def test_interrupted_generate_leaves_a_usable_llm(pair, monkeypatch):
    """An exception (e.g. Ctrl-C) after a call took the donated state: the next generate starts afresh."""
    llm, _ = pair
    p = random_prompts(np.random.RandomState(44), 1, 3, 6)
    want = llm.generate(p, max_new_tokens=4).tokens
    real = llm.engine.generate_steps

    def boom(state, n, **kw):
        real(state, n, **kw)   # the state is donated, then the call is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "generate_steps", boom)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(p, max_new_tokens=4)
    monkeypatch.setattr(llm.engine, "generate_steps", real)
    assert llm.generate(p, max_new_tokens=4).tokens == want


def test_extreme_temperature_and_top_p_act_as_greedy(pair):
    """A positive temperature or top_p far below float32's normal range is as good as greedy (it overflowed the
    logits to NaN, or flushed to "no filter"), for sampling and for beam search's scores."""
    llm, model = pair
    prompts = random_prompts(np.random.RandomState(45), 3, 3, 8)
    greedy = llm.generate(prompts, max_new_tokens=6, end_id=None)
    for kw in (dict(temperature=1e-38, top_k=5), dict(top_p=1e-45), dict(temperature=1e-30, top_p=0.9)):
        res = llm.generate(prompts, max_new_tokens=6, end_id=None, random_seed=[1, 2, 3], return_log_probs=True,
                           **kw)
        assert res.tokens == greedy.tokens, kw
        assert np.all(np.isfinite(np.concatenate(res.output_log_probs))), kw
    beam = llm.generate(prompts[:1], max_new_tokens=4, end_id=None, beam_width=2, temperature=1e-38,
                        return_log_probs=True)
    assert np.all(np.isfinite(beam.output_log_probs[0])) and len(beam.tokens[0]) == 4
