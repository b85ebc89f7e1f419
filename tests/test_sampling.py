"""ftjax.sampling against independent references: HF transformers' logits processors / warpers and
beam search, numpy, and a chi-square goodness-of-fit test of the sampler (fixed seeds)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import sampling as S
from ftjax.sampling import MODEL_DEFAULT, SamplingParams, params_for_batch

torch = pytest.importorskip("torch")
from transformers.generation import logits_process as hf  # noqa: E402

V = 50
process = jax.jit(S.process_logits)
sample = jax.jit(S.sample, static_argnames="max_top_k")


# ------------------------------------------------------------------------------------------------
# SamplingParams: validation, word lists, keyword expansion
# ------------------------------------------------------------------------------------------------

BAD = [
    ("top_p", -0.1), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("temperature", -0.5),
    ("temperature", float("nan")), ("beam_width", 0), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("min_length", -1), ("random_seed", -1), ("random_seed", 2**64),
    ("top_p_decay", 0.0), ("top_p_decay", 1.5), ("top_p_min", -0.1), ("end_id", -3), ("start_id", -1),
    ("bad_words", [[]]), ("bad_words", [[1, -4]]), ("bad_words", "abc"), ("bad_words", [1, 2]),
    ("bad_words", np.zeros((3, 4), np.int32)), ("bad_words", np.array([[1, 2, 3], [2, 1, -1]])),
    ("bad_words", np.array([[1, 2, 3], [1, -1, 2]])), ("bad_words", np.array([[1, 2, 3], [4, -1, -1]])),
    ("stop_words", [[1], "x"]), ("stop_words", np.array([[1.0, 2.0], [1.0, 2.0]])),
    ("top_p_reset_ids", [-5]), ("return_log_probs", "yes"), ("len_penalty", float("inf")),
    ("presence_penalty", "a"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_request_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("top_k", 51), ("beam_width", 5), ("bad_words", [[3, 50]]), ("stop_words", [[99]]), ("end_id", 50),
    ("start_id", 70), ("top_p_reset_ids", [50])])
def test_verify_names_field(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        p.verify(V, max_beam_width=4)
    SamplingParams().verify(V, 4)


def test_defaults_and_greedy():
    p = SamplingParams()
    assert (p.top_k, p.top_p, p.temperature, p.repetition_penalty, p.presence_penalty, p.min_length,
            p.len_penalty, p.beam_width, p.beam_search_diversity_rate, p.random_seed, p.start_id,
            p.stop_words, p.bad_words, p.return_log_probs, p.top_p_decay) == \
        (0, 0.0, 1.0, 1.0, 0.0, 0, 1.0, 1, 0.0, 0, None, (), (), False, 1.0)
    assert p.end_id is MODEL_DEFAULT and p.greedy
    assert SamplingParams(top_k=1).greedy and SamplingParams(top_p=0.5, temperature=0).greedy
    assert not SamplingParams(top_k=2).greedy and not SamplingParams(top_p=0.3).greedy
    assert SamplingParams(end_id=None).end_id is None
    with pytest.raises(dataclasses_frozen()):
        p.top_k = 3


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_word_lists_ft_encoding():
    ft = np.array([[1, 2, 3, 4, 5, 0], [2, 3, 5, -1, -1, -1]], np.int32)
    want = ((1, 2), (3,), (4, 5))
    assert SamplingParams(bad_words=ft).bad_words == want
    assert SamplingParams(stop_words=ft[None]).stop_words == want
    assert SamplingParams(bad_words=[[1, 2], [3], np.array([4, 5])]).bad_words == want
    assert SamplingParams(stop_words=np.array([[0, 0], [-1, -1]], np.int32)).stop_words == ()
    assert SamplingParams(top_p_reset_ids=-1).top_p_reset_ids == ()
    assert SamplingParams(top_p_reset_ids=7).top_p_reset_ids == (7,)


def test_params_for_batch():
    ps = params_for_batch(3, top_k=[1, 5, 0], temperature=0.5, bad_words=[[1, 2]], top_p_reset_ids=[4, 5])
    assert [p.top_k for p in ps] == [1, 5, 0] and all(p.temperature == 0.5 for p in ps)
    assert all(p.bad_words == ((1, 2),) and p.top_p_reset_ids == (4, 5) for p in ps)
    assert params_for_batch(2, random_seed=np.array([3, 4]))[1].random_seed == 4
    assert params_for_batch(2, end_id=[None, 3])[0].end_id is None
    with pytest.raises(ValueError, match="top_p"):
        params_for_batch(3, top_p=[0.1, 0.2])
    with pytest.raises(ValueError, match="top_pp"):
        params_for_batch(3, top_pp=0.1)
    with pytest.raises(ValueError, match="temperature"):
        params_for_batch(2, temperature=[1.0, -1.0])
    p = SamplingParams(top_k=4)
    assert params_for_batch(2, params=p) == [p, p]
    assert SamplingParams.from_kwargs(2, top_k=[2, 3])[1].top_k == 3
    with pytest.raises(ValueError, match="params"):
        params_for_batch(2, params=[p])


def test_pack_and_capacity():
    ps = [SamplingParams(top_k=3, bad_words=[[1, 2, 3, 4, 5]], stop_words=[[7]] * 5, random_seed=2**40 + 5),
          None, SamplingParams(end_id=None)]
    assert S.word_capacity_for(ps) == (8, 8)
    assert S.word_capacity_for([SamplingParams()]) == (4, 4)
    sp = S.pack(ps, 4, vocab=V, eos_id=9)
    assert sp.bad_words.shape == (4, 8, 8) and sp.stop_words.shape == (4, 8, 8)
    assert sp.bad_words[0, 0].tolist() == [-1, -1, -1, 1, 2, 3, 4, 5]
    assert sp.end_id.tolist() == [9, -1, -1, -1] and sp.greedy.tolist() == [False, True, True, True]
    assert sp.seed[0].tolist() == [2**8, 5]
    with pytest.raises(ValueError, match="bad_words"):
        S.pack([SamplingParams(bad_words=[[60]])], 2, vocab=V)
    with pytest.raises(ValueError, match="capacity"):
        S.pack(ps, 4, vocab=V, word_capacity=(4, 4))


# ------------------------------------------------------------------------------------------------
# process_logits vs HF processors
# ------------------------------------------------------------------------------------------------

def _random_batch(rng, B, S_, V_):
    seq = rng.integers(0, V_, (B, S_)).astype(np.int32)
    prompt_len = rng.integers(1, S_ // 2, B).astype(np.int32)
    seq_len = np.minimum(prompt_len + rng.integers(0, S_ // 2, B), S_).astype(np.int32)
    return seq, prompt_len, seq_len, (seq_len - prompt_len).astype(np.int32)


def test_process_logits_matches_hf():
    rng = np.random.default_rng(0)
    B, S_ = 8, 12
    seq, prompt_len, seq_len, gen = _random_batch(rng, B, S_, 30)  # ids < 30 so repeats are common
    logits = rng.normal(0, 3, (B, V)).astype(np.float32)
    params = []
    for b in range(B):
        # bad words: a single token, and one whose prefix is the row's last token(s) so it fires
        tail = seq[b, seq_len[b] - 2:seq_len[b]].tolist()
        params.append(SamplingParams(
            top_k=5, temperature=float(rng.uniform(0.3, 2.0)), repetition_penalty=float(rng.uniform(0.5, 2.0)),
            min_length=int(rng.integers(0, 6)), end_id=int(b + 31),
            bad_words=[[40 + b % 5], tail + [45], tail[-1:] + [46], [49, 48, 47]]))
    sp = S.pack(params, B, vocab=V)
    got = np.asarray(jax.jit(S.process_logits)(logits, sp, seq, prompt_len, seq_len, gen))
    for b, p in enumerate(params):
        ids = torch.tensor(seq[None, b, :seq_len[b]].astype(np.int64))
        x = torch.tensor(logits[None, b])
        x = hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
        x = hf.NoBadWordsLogitsProcessor([list(w) for w in p.bad_words])(ids, x)
        x = hf.MinNewTokensLengthLogitsProcessor(int(prompt_len[b]), p.min_length, p.end_id)(ids, x)
        x = hf.TemperatureLogitsWarper(p.temperature)(ids, x).numpy()[0]
        np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(x), err_msg=f"row {b}")
        np.testing.assert_allclose(got[b][np.isfinite(x)], x[np.isfinite(x)], rtol=1e-6, atol=1e-6)
        assert got[b, 45] == -np.inf and got[b, 46] == -np.inf and np.isfinite(got[b, 47]) or seq[b, seq_len[b] - 1] == 48


def test_presence_penalty_and_temperature_zero():
    rng = np.random.default_rng(1)
    B, S_ = 4, 10
    seq, prompt_len, seq_len, gen = _random_batch(rng, B, S_, V)
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    sp = S.pack([SamplingParams(presence_penalty=0.7, temperature=0.0)] * B, B, vocab=V)
    got = np.asarray(process(logits, sp, seq, prompt_len, seq_len, gen))
    want = logits.copy()
    for b in range(B):
        want[b, np.unique(seq[b, prompt_len[b]:seq_len[b]])] -= 0.7
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _warp_hf(x, top_k, top_p, temperature):
    t = torch.tensor(x[None])
    ids = torch.zeros((1, 1), dtype=torch.long)
    t = hf.TemperatureLogitsWarper(temperature)(ids, t)
    if top_k:
        t = hf.TopKLogitsWarper(top_k)(ids, t)
    if 0 < top_p < 1:
        t = hf.TopPLogitsWarper(top_p)(ids, t)
    return t.numpy()[0]


def test_filter_matches_hf_warpers():
    rng = np.random.default_rng(2)
    cfgs = [(k, p, t) for k in (0, 1, 3, 17, 50) for p in (0.0, 0.3, 0.9, 1.0) for t in (0.5, 1.0, 1.7)
            if not (k == 0 and p == 0)]
    B = len(cfgs)
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    logits[0, :4] = logits[0, 4]  # a tie
    params = [SamplingParams(top_k=k, top_p=p, temperature=t) for k, p, t in cfgs]
    sp = S.pack(params, B, vocab=V)
    x = np.asarray(process(logits, sp, np.zeros((B, 1), np.int32), np.zeros(B, np.int32),
                                    np.zeros(B, np.int32), np.zeros(B, np.int32)))
    got = np.asarray(jax.jit(S.filter_logits)(x, sp))
    for b, (k, p, t) in enumerate(cfgs):
        want = _warp_hf(logits[b], k, p, t)
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(want), err_msg=str(cfgs[b]))
        # every sampled token lies in HF's kept set, whichever path (fast: max_top_k=8; full sort) ran
    tok, _ = jax.jit(lambda x, sp, g: S.sample(x, sp, g, max_top_k=8))(x, sp, np.arange(B, dtype=np.int32))
    assert np.all(np.isfinite(got[np.arange(B), np.asarray(tok)]))


def test_top_k_1_is_greedy_and_logprobs():
    rng = np.random.default_rng(3)
    B = 16
    logits = rng.normal(0, 2, (B, V)).astype(np.float32)
    half = B // 2
    params = [SamplingParams(top_k=1, random_seed=b, temperature=0.7) for b in range(half)] + \
             [SamplingParams(temperature=0.7)] * half
    sp = S.pack(params, B, vocab=V)
    x = logits / 0.7
    tok, lp = sample(jnp.asarray(x), sp, jnp.zeros(B, jnp.int32))
    np.testing.assert_array_equal(np.asarray(tok), x.argmax(-1))
    ref = torch.log_softmax(torch.tensor(x), -1).numpy()[np.arange(B), x.argmax(-1)]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-6)
    # sampled rows: logprob is the full log-softmax of the processed logits at the drawn token
    sp2 = S.pack([SamplingParams(top_k=10, top_p=0.9, random_seed=b) for b in range(B)], B, vocab=V)
    tok, lp = sample(jnp.asarray(x), sp2, jnp.full(B, 3, jnp.int32))
    ref = torch.log_softmax(torch.tensor(x), -1).numpy()[np.arange(B), np.asarray(tok)]
    np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# Sampling distribution (chi-square, fixed seeds) and reproducibility
# ------------------------------------------------------------------------------------------------

def _chi2_pvalue(counts, probs):
    n = counts.sum()
    m = probs > 0
    exp = n * probs[m]
    stat = float(np.sum((counts[m] - exp) ** 2 / exp))
    df = int(m.sum()) - 1
    return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0)), stat, df


@pytest.mark.parametrize("cfg,max_top_k", [
    (dict(top_k=5, temperature=0.7), 16),
    (dict(top_p=0.8, temperature=1.3), 16),
    (dict(top_k=8, top_p=0.9), 12),
    (dict(top_p=0.95), 4),          # nucleus wider than the candidates: the full-sort path
    (dict(top_k=9), 4),             # top_k beyond the candidates: the full-sort path
    (dict(top_p=1.0, temperature=0.5), 16),
])
def test_sampling_distribution_chi2(cfg, max_top_k):
    Vs, N = 16, 4000
    rng = np.random.default_rng(4)
    row = rng.normal(0, 1.0, Vs).astype(np.float32)
    params = [SamplingParams(random_seed=1000 + i, **cfg) for i in range(N)]
    sp = S.pack(params, N, vocab=Vs)
    x = process(jnp.tile(row, (N, 1)), sp, jnp.zeros((N, 1), jnp.int32), jnp.zeros(N, jnp.int32),
                         jnp.zeros(N, jnp.int32), jnp.zeros(N, jnp.int32))
    tok, _ = jax.jit(lambda x, sp, g: S.sample(x, sp, g, max_top_k=max_top_k))(x, sp, jnp.full(N, 7, jnp.int32))
    want = _warp_hf(row, cfg.get("top_k", 0), cfg.get("top_p", 0.0), cfg.get("temperature", 1.0))
    probs = torch.softmax(torch.tensor(want), -1).numpy().astype(np.float64)
    counts = np.bincount(np.asarray(tok), minlength=Vs)
    assert counts[probs == 0].sum() == 0
    pval, stat, df = _chi2_pvalue(counts, probs)
    assert pval > 1e-3, (cfg, stat, df, pval)
    # and the test has power: a slightly sharper distribution on the same support is rejected
    wrong = probs ** 1.5 / np.sum(probs ** 1.5)
    assert _chi2_pvalue(counts, wrong)[0] < 1e-4


def test_seed_reproducible_across_rows_and_batches():
    rng = np.random.default_rng(5)
    B = 12
    logits = jnp.asarray(np.tile(rng.normal(0, 1, V).astype(np.float32), (B, 1)))
    run = jax.jit(lambda x, sp, g: S.sample(x, sp, g, max_top_k=8))
    a = [SamplingParams(top_k=6, random_seed=s) for s in range(B)]
    perm = rng.permutation(B)
    ta, _ = run(logits, S.pack(a, B, vocab=V), jnp.full(B, 2, jnp.int32))
    tb, _ = run(logits, S.pack([a[i] for i in perm], B, vocab=V), jnp.full(B, 2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(ta)[perm], np.asarray(tb))
    # mixing in rows that need the full-sort path does not change the other rows' tokens
    mixed = [a[i] if i % 2 == 0 else SamplingParams(top_p=0.99, random_seed=i) for i in range(B)]
    tm, _ = run(logits, S.pack(mixed, B, vocab=V), jnp.full(B, 2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(tm)[::2], np.asarray(ta)[::2])
    # same seed, different step -> a fresh draw (not all equal); same seed everywhere -> one token
    tc, _ = run(logits, S.pack([a[0]] * B, vocab=V, num_slots=B), jnp.arange(B, dtype=jnp.int32))
    assert len(set(np.asarray(tc).tolist())) > 1
    td, _ = run(logits, S.pack([a[3]] * B, vocab=V, num_slots=B), jnp.full(B, 2, jnp.int32))
    assert set(np.asarray(td).tolist()) == {int(ta[3])}


def test_no_recompile_when_values_change():
    B = 4
    step = jax.jit(lambda x, sp, seq, pl, sl, g, p: S.sample(S.process_logits(x, sp, seq, pl, sl, g), sp, g, p))
    rng = np.random.default_rng(6)
    seq, pl, sl, g = _random_batch(rng, B, 8, V)
    for i, ps in enumerate([[SamplingParams()] * B,
                            [SamplingParams(top_k=3, temperature=0.5, random_seed=9), SamplingParams(),
                             SamplingParams(top_p=0.7, repetition_penalty=1.3, bad_words=[[1, 2]]),
                             SamplingParams(top_k=1, min_length=3, end_id=5, stop_words=[[3, 4]])]]):
        sp = S.pack(ps, B, vocab=V, eos_id=2)
        step(rng.normal(size=(B, V)).astype(np.float32), sp, seq, pl, sl, g, sp.top_p)
    assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# stop words, factual nucleus
# ------------------------------------------------------------------------------------------------

def test_stop_hit():
    seq = np.array([[5, 1, 2, 3, 0, 0], [5, 1, 2, 3, 0, 0], [7, 8, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6]], np.int32)
    seq_len = np.array([4, 3, 3, 6], np.int32)
    prompt_len = np.array([1, 1, 2, 6], np.int32)
    ps = [SamplingParams(stop_words=[[9], [2, 3]]), SamplingParams(stop_words=[[2, 3], [1, 2]]),
          SamplingParams(stop_words=[[6, 7, 8, 9], [8, 9]]), SamplingParams(stop_words=[[5, 6]])]
    sp = S.pack(ps, 4, vocab=V)
    got = np.asarray(S.stop_hit(seq, seq_len, sp, prompt_len))
    np.testing.assert_array_equal(got, [True, True, True, False])  # row 3: nothing generated yet
    got = np.asarray(S.stop_hit(seq, seq_len, sp))
    np.testing.assert_array_equal(got, [True, True, True, True])
    sp0 = S.pack([SamplingParams()] * 4, 4, vocab=V)
    assert not np.asarray(S.stop_hit(seq, seq_len, sp0)).any()


def test_next_top_p():
    sp = S.pack([SamplingParams(top_p=0.8, top_p_decay=0.5, top_p_min=0.3, top_p_reset_ids=[4, 6]),
                 SamplingParams(top_p=0.8)], 2, vocab=V)
    p = jnp.asarray(sp.top_p)
    p = S.next_top_p(p, jnp.array([1, 1]), sp)
    np.testing.assert_allclose(p, [0.4, 0.8])
    p = S.next_top_p(p, jnp.array([1, 1]), sp)
    np.testing.assert_allclose(p, [0.3, 0.8])
    p = S.next_top_p(p, jnp.array([6, 6]), sp)
    np.testing.assert_allclose(p, [0.8, 0.8])


# ------------------------------------------------------------------------------------------------
# Beam search vs HF generate(num_beams=...)
# ------------------------------------------------------------------------------------------------

def _tiny_gpt2(seed, vocab, eos):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return m


def _our_beam(model, prompts, widths, W, T, eos, len_penalty, rep=1.0, diversity=0.0):
    """Drive beam_step with the HF model's logits (full forward per step, no cache)."""
    G = len(prompts)
    st = S.beam_init(G, W, T, widths)
    sp = S.pack([SamplingParams(repetition_penalty=rep, end_id=eos)] * (G * W), G * W, vocab=model.config.vocab_size)
    seqs = [[list(p) for _ in range(W)] for p in prompts]
    bstep = jax.jit(S.beam_step)
    blp = jax.jit(S.beam_log_probs)
    L = max(len(p) for p in prompts) + T
    kw = dict(end_id=jnp.full(G, eos, jnp.int32), len_penalty=jnp.full(G, len_penalty, jnp.float32),
              diversity_rate=jnp.full(G, diversity, jnp.float32), beam_width=jnp.asarray(widths, jnp.int32),
              max_new_tokens=jnp.full(G, T, jnp.int32))
    for _ in range(T):
        seq = np.zeros((G * W, L), np.int32)
        sl = np.array([len(s) for g in seqs for s in g], np.int32)
        pl = np.array([len(prompts[g]) for g in range(G) for _ in range(W)], np.int32)
        logits = np.zeros((G * W, model.config.vocab_size), np.float32)
        for g in range(G):
            for j in range(W):
                seq[g * W + j, :len(seqs[g][j])] = seqs[g][j]
            with torch.no_grad():
                logits[g * W:(g + 1) * W] = model(torch.tensor(seqs[g])).logits[:, -1].numpy()
        lp = blp(logits, sp, seq, pl, sl, sl - pl)
        st, parent, tok = bstep(st, lp.reshape(G, W, -1), **kw)
        parent, tok, done = np.asarray(parent), np.asarray(tok), np.asarray(st.done)
        seqs = [[seqs[g][parent[g, j]] + [int(tok[g, j])] for j in range(W)] for g in range(G)]
        if done.all():
            break
    return st


@pytest.mark.parametrize("len_penalty,rep", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.5), (-1.0, 1.0)])
def test_beam_search_matches_hf(len_penalty, rep):
    Vb, eos, T = 24, 3, 7
    model = _tiny_gpt2(11, Vb, eos)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, Vb, n).tolist() for n in (3, 5, 4, 2)]
    widths = [3, 2, 4, 1]
    W = 4
    st = _our_beam(model, prompts, widths, W, T, eos, len_penalty, rep)
    ended_early = 0
    for g, (prompt, w) in enumerate(zip(prompts, widths)):
        out = model.generate(torch.tensor([prompt]), num_beams=w, num_return_sequences=w, max_new_tokens=T,
                             length_penalty=len_penalty, repetition_penalty=rep, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, early_stopping=False,
                             output_scores=True, return_dict_in_generate=True)
        if w == 1 and rep != 1.0:
            continue  # HF's num_beams=1 is greedy search: penalties on logits, not on log-softmax
        for j in range(w):
            hf_toks = out.sequences[j, len(prompt):].tolist()
            n = int(st.fin_len[g, j])
            ours = np.asarray(st.fin_tokens[g, j, :n]).tolist()
            if eos in hf_toks:
                hf_toks = hf_toks[:hf_toks.index(eos) + 1]
            ended_early += n < T
            assert ours == hf_toks[:len(hf_toks)], (g, j, ours, hf_toks)
            if getattr(out, "sequences_scores", None) is not None:
                np.testing.assert_allclose(float(st.fin_score[g, j]), float(out.sequences_scores[j]), rtol=1e-5,
                                           atol=1e-5)
    assert ended_early > 0 or len_penalty != 1.0


def test_beam_diversity_rate_ranks_siblings():
    # two parents, a huge negative diversity rate: the children of each parent's best token win
    G, W = 1, 2
    st = S.beam_init(G, W, 5)._replace(cum=jnp.array([[0.0, -1.0]]), step=jnp.array([1]))
    lp = jnp.log(jnp.array([[[0.5, 0.4, 0.1, 0, 0, 0], [0.5, 0.4, 0.1, 0, 0, 0]]]) + 1e-9)
    kw = dict(end_id=jnp.array([-1]), len_penalty=jnp.array([1.0]), beam_width=jnp.array([2]),
              max_new_tokens=jnp.array([5]))
    step = jax.jit(S.beam_step)
    _, parent, tok = step(st, lp, diversity_rate=jnp.array([0.0]), **kw)
    assert np.asarray(parent).tolist() == [[0, 0]] and np.asarray(tok).tolist() == [[0, 1]]
    _, parent, tok = step(st, lp, diversity_rate=jnp.array([-10.0]), **kw)
    assert np.asarray(parent).tolist() == [[0, 1]] and np.asarray(tok).tolist() == [[0, 0]]
