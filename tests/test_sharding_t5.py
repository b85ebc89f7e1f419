"""T5 pipeline parallel (with and without tensor parallel) on 8 virtual CPU devices (attention="xla",
float32): encoder and decoder layers each in P stage blocks give one device's greedy tokens, beams and
logits; params and the staged cache sit where the rule table says; the pipelined decode step moves
activations (collective-permute) and never gathers another stage's weights; bad layouts name the numbers."""
import re

import jax
import numpy as np
import pytest

import ftjax
from ftjax.checkpoint import load_checkpoint
from ftjax.sharding import rules as R
from tests.test_sharding import _close, _llm, assert_no_stage_all_gather
from tests.test_t5 import V, make_hf_t5

ENC = [np.random.RandomState(7).randint(2, V, size=n).tolist() for n in (5, 11, 3, 8)]
DEC = [[0] + e[:4] for e in ENC]


@pytest.fixture(scope="module")
def t5_22(tmp_path_factory):
    """v1.1 (gated GELU, untied lm_head), encoder 2 / decoder 2 layers."""
    path = str(tmp_path_factory.mktemp("pp_t5_22"))
    make_hf_t5(path, proj="gated-gelu", scale=False, seed=1)
    return path


@pytest.fixture(scope="module")
def t5_44(tmp_path_factory):
    """v1.0 (ReLU, tied and scaled), encoder 4 / decoder 4 layers: P=4 divides both."""
    path = str(tmp_path_factory.mktemp("pp_t5_44"))
    make_hf_t5(path, enc_layers=4, dec_layers=4, seed=14)
    return path


@pytest.fixture(scope="module")
def t5_24(tmp_path_factory):
    """v1.0, encoder 2 / decoder 4 (deeper decoder)."""
    path = str(tmp_path_factory.mktemp("pp_t5_24"))
    make_hf_t5(path, enc_layers=2, dec_layers=4, seed=13)
    return path


def _ref(path, cache={}):  # noqa: B006 — one single-device reference per checkpoint
    if path not in cache:
        llm = _llm(path)
        cache[path] = (llm.generate(ENC, max_new_tokens=8, end_id=None).tokens, llm.logits(ENC, DEC))
    return cache[path]


@pytest.mark.parametrize("which,T,P", [("t5_22", 1, 2), ("t5_22", 2, 2), ("t5_24", 2, 2), ("t5_44", 1, 4),
                                       ("t5_44", 2, 4)])
def test_t5_pipeline_matches_one_device(which, T, P, request):
    path = request.getfixturevalue(which)
    toks, logits = _ref(path)
    llm = _llm(path, T, P)
    assert llm.generate(ENC, max_new_tokens=8, end_id=None).tokens == toks
    _close(llm.logits(ENC, DEC), logits)


def test_t5_pipeline_placement_beams_and_hlo(t5_22):
    llm = _llm(t5_22, 2, 2, max_beam_width=2)
    eng = llm.engine
    lay = eng.layout
    # every param where the rule table says, stage-stacked encoder and decoder layers
    flat_axes = jax.tree.leaves(lay.param_axes(eng.cfg), is_leaf=R.is_axes)
    flat = jax.tree.leaves(eng.params)
    assert len(flat_axes) == len(flat)
    for ax, a in zip(flat_axes, flat):
        want = jax.sharding.NamedSharding(lay.mesh, R.spec(ax, lay.rules))
        assert a.sharding.is_equivalent_to(want, a.ndim), (ax, a.sharding)
        if a.ndim >= 2 and any(lay.rules.get(x) for x in ax if x):   # (V=131 at T=2: the table replicates vocab)
            assert not a.sharding.is_fully_replicated, (ax, a.shape)
    for part in ("encoder", "decoder"):   # every stage-stacked layer weight lives on its own stage only
        for a in jax.tree.leaves(eng.params[part]["stages"]):
            assert tuple(a.sharding.spec)[0] == "pipeline", a.sharding
    for part in ("encoder", "decoder"):
        q = eng.params[part]["stages"][0]["attn" if part == "encoder" else "self_attn"]["q"]["kernel"]
        assert tuple(q.sharding.spec)[:3] == ("pipeline", None, "tensor")
    st = eng.init_state()
    for c in st.cache["layers"]:
        for a in c.values():   # [B, P, n, S, h]: stage dim over pipeline, heads over tensor
            assert a.shape[1] == 2 and tuple(a.sharding.spec)[:3] == (None, "pipeline", "tensor"), a.sharding
    assert st.cache["enc_len"].sharding.is_fully_replicated

    # beam search: only the self K/V rows move; the same beams as one device
    one = _llm(t5_22, max_beam_width=2)
    kw = dict(max_new_tokens=6, end_id=None, beam_width=2)
    assert llm.generate(ENC[:2], **kw).beams == one.generate(ENC[:2], **kw).beams

    hlo = eng._generate.lower(eng.params, st, np.int32(0), rem=4, chunked=False, beam=True).compile().as_text()
    assert "collective-permute" in hlo
    assert_no_stage_all_gather(hlo, [eng.params[p]["stages"] for p in ("encoder", "decoder")])
    pre = jax.jit(eng._prefill_fn).lower(eng.params, np.zeros((4, 16), np.int32), np.ones((4,), np.int32),
                             eng._pack([], 4)).compile().as_text()
    assert "collective-permute" in pre


def test_t5_pipeline_from_ftjax_checkpoint(t5_22, tmp_path):
    """An orbax checkpoint restored per stage (each layer onto its stage's devices), then stacked."""
    from ftjax.checkpoint import orbax_io

    cfg, params = load_checkpoint(t5_22)
    dst = str(tmp_path / "ft")
    orbax_io.save(dst, cfg, params)
    llm = ftjax.load(dst, dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32, max_beam_width=1,
                     tensor_parallel=2, pipeline_parallel=2)
    assert "stages" in llm.engine.params["decoder"]
    toks, logits = _ref(t5_22)
    assert llm.generate(ENC, max_new_tokens=8, end_id=None).tokens == toks
    _close(llm.logits(ENC, DEC), logits)


def test_t5_bad_pipeline_names_the_numbers(t5_22):
    from ftjax.config import T5Config
    from ftjax.sharding.mesh import check_layout

    with pytest.raises(ValueError, match=re.escape("pipeline_parallel=4 does not divide the model's 2 encoder layers")):
        ftjax.load(t5_22, dtype="float32", attention="xla", pipeline_parallel=4)
    cfg = T5Config(vocab_size=64, hidden=32, head_dim=8, ffn_dim=48, num_heads=4, num_encoder_layers=2,
                   num_decoder_layers=3)
    with pytest.raises(ValueError, match=re.escape("pipeline_parallel=2 does not divide the model's 3 decoder layers")):
        check_layout(cfg, 1, 2)
