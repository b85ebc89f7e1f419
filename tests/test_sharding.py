"""Tensor x pipeline parallel on 8 virtual CPU devices (attention="xla", float32): every layout gives the
greedy tokens of one device and its logits; params sit where the rule table says; the pipelined step
moves activations (collective-permute) and never gathers another stage's weights; bad layouts are
refused with the numbers."""
import re

import jax
import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint import load_checkpoint
from ftjax.sharding import rules as R
from ftjax.sharding.mesh import make_mesh
from tests.conftest import make_hf_gpt2, random_prompts

# tensor only (2; 8 with the vocab padded), pipeline only (a layer a stage), both (2 x 2, 4 x 2); 2 x 4 is in
# test_gpt2_tied_layouts. (Every layout of 8 devices was run once; this subset keeps the suite's time.)
LAYOUTS = [(2, 1), (8, 1), (1, 4), (2, 2), (4, 2)]


def _llm(path, T=1, P=1, **kw):
    cfg, params = load_checkpoint(path)
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_beam_width", 1)
    mesh = make_mesh(T, P) if T * P > 1 else None
    return ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_seq_len=32, mesh=mesh, **kw)


def assert_no_stage_all_gather(hlo: str, stages) -> None:
    """No all-gather in the compiled text produces a stacked stage weight's global shape (that would be
    another stage's weights arriving)."""
    shapes = {tuple(a.shape) for a in jax.tree.leaves(stages)}
    for line in hlo.splitlines():
        if "all-gather(" in line:
            m = re.search(r"= \w+\[([\d,]*)\]", line)
            got = tuple(int(x) for x in m.group(1).split(",") if x) if m else ()
            assert got not in shapes, line.strip()[:200]


def _close(ours, ref):
    """float32 logits within 1e-5 (relative to the largest logit: TP sums partial products in another order)."""
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err < 1e-5, err


@pytest.fixture(scope="module")
def gpt2_untied(tmp_path_factory):
    """vocab 211 (divisible by no T > 1: padded), 8 heads, 4 layers, untied head."""
    path = str(tmp_path_factory.mktemp("tp_gpt2_untied"))
    make_hf_gpt2(path, n_head=8, n_layer=4, tie=False, activation="gelu", seed=3)
    return path


@pytest.fixture(scope="module")
def gpt2_tied(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tp_gpt2_tied"))
    make_hf_gpt2(path, n_head=8, n_layer=4, n_inner=72, seed=4)
    return path


def write_llama_gqa(path: str, hidden: int, seed: int) -> str:
    """A random HF LLaMA with 8 heads and 2 kv heads, 2 layers (at T=4 the kv heads are replicated)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=211, hidden_size=hidden, num_attention_heads=8, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=210, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    """8 heads, 2 kv heads: at T=4 the kv heads are replicated."""
    return write_llama_gqa(str(tmp_path_factory.mktemp("tp_llama")), hidden=64, seed=5)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    import transformers

    path = str(tmp_path_factory.mktemp("tp_t5"))
    torch.manual_seed(6)
    cfg = transformers.T5Config(vocab_size=136, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


PROMPTS = random_prompts(np.random.RandomState(0), 4, 1, 14)


@pytest.fixture(scope="module")
def untied_ref(gpt2_untied):
    llm = _llm(gpt2_untied)
    return llm.generate(PROMPTS, max_new_tokens=10, end_id=None).tokens, llm.logits(PROMPTS)


@pytest.mark.parametrize("T,P", LAYOUTS)
def test_gpt2_layouts_match_one_device(gpt2_untied, untied_ref, T, P):
    toks, logits = untied_ref
    llm = _llm(gpt2_untied, T, P)
    assert llm.generate(PROMPTS, max_new_tokens=10, end_id=None).tokens == toks
    _close(llm.logits(PROMPTS), logits)


def test_bfloat16_pipeline(gpt2_untied):
    """The default dtype on a pipelined mesh (every other mesh test is float32): it runs (XLA:CPU aborted the
    process on the stages' bf16 all-reduce) and its logits are the one-device bf16 engine's within bf16 noise."""
    cfg, params = load_checkpoint(gpt2_untied)
    one = ftjax.LLM(cfg, params, dtype="bfloat16", attention="xla", max_seq_len=32, max_batch_size=4, max_beam_width=1)
    two = ftjax.LLM(cfg, params, dtype="bfloat16", attention="xla", max_seq_len=32, max_batch_size=4, max_beam_width=1,
                    mesh=make_mesh(2, 2))
    ref, ours = one.logits(PROMPTS), two.logits(PROMPTS)
    assert np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()) < 3e-2
    assert [len(t) for t in two.generate(PROMPTS, max_new_tokens=4, end_id=None).tokens] == [4] * len(PROMPTS)


@pytest.mark.parametrize("T,P", [(2, 4)])
def test_gpt2_tied_layouts(gpt2_tied, T, P):
    ref = _llm(gpt2_tied)
    llm = _llm(gpt2_tied, T, P)
    assert llm.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens == \
        ref.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens
    _close(llm.logits(PROMPTS), ref.logits(PROMPTS))


@pytest.mark.parametrize("T,P", [(2, 1), (4, 2)])   # kv heads split; replicated (T=4 > 2 kv heads) and pipelined
def test_llama_gqa_replicated_kv(llama_gqa, T, P):
    ref = _llm(llama_gqa)
    llm = _llm(llama_gqa, T, P)
    # 2 kv heads: split at T=2, replicated at T=4
    assert llm.engine.layout.rules["kv_heads"] == ("tensor" if T == 2 else None)
    k = llm.engine.params["layers_0"]["attn"]["k"]["kernel"] if P == 1 else \
        llm.engine.params["stages"][0]["attn"]["k"]["kernel"]
    assert ("tensor" in jax.tree.leaves(tuple(k.sharding.spec))) == (T == 2)
    assert llm.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens == \
        ref.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens
    _close(llm.logits(PROMPTS), ref.logits(PROMPTS))
    if (T, P) == (4, 2):
        # Sampling is reproducible across device layouts: same seeds, same tokens as one device.
        kw = dict(max_new_tokens=8, end_id=None, top_k=[0, 20, 5], top_p=[0.9, 0.0, 0.8], temperature=1.2,
                  random_seed=[11, 12, 13])
        assert llm.generate(PROMPTS[:3], **kw).tokens == ref.generate(PROMPTS[:3], **kw).tokens


@pytest.mark.parametrize("T", [4])
def test_t5_tensor_parallel(t5_dir, T):
    ref = _llm(t5_dir)
    llm = _llm(t5_dir, T)
    enc = random_prompts(np.random.RandomState(1), 3, 2, 10, vocab=136)
    assert llm.generate(enc, max_new_tokens=8, end_id=None).tokens == \
        ref.generate(enc, max_new_tokens=8, end_id=None).tokens
    dec = [[0] + e[:4] for e in enc]
    _close(llm.logits(enc, dec), ref.logits(enc, dec))


def _check_placement(llm):
    eng = llm.engine
    lay = eng.layout
    axes = lay.param_axes(eng.cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=R.is_axes)
    flat = jax.tree.leaves(eng.params)
    assert len(flat_axes) == len(flat)
    for ax, a in zip(flat_axes, flat):
        want = R.spec(ax, lay.rules)
        assert a.sharding.is_equivalent_to(jax.sharding.NamedSharding(lay.mesh, want), a.ndim), (ax, a.sharding)
        if a.ndim >= 2:   # every matrix is split over some mesh axis: nothing large is replicated
            assert not a.sharding.is_fully_replicated, (ax, a.shape)
    st = eng.init_state()
    for c in jax.tree.leaves(st.cache):
        if c.ndim > 1:
            assert not c.sharding.is_fully_replicated, c.sharding
    return st


@pytest.mark.parametrize("which,T,P", [("gpt2_untied", 4, 2), ("gpt2_tied", 8, 1), ("t5_dir", 4, 1)])
def test_params_sharded_by_rule_table(which, T, P, request):
    llm = _llm(request.getfixturevalue(which), T, P)
    _check_placement(llm)
    # Megatron layout, spelled out: column-parallel in, row-parallel out, vocab-parallel embedding.
    p = llm.engine.params
    blk = p["stages"][0] if P > 1 else p["layers_0"] if "layers_0" in p else p["decoder"]["layers_0"]
    attn = blk["attn"] if "attn" in blk else blk["self_attn"]
    tp = lambda a: tuple(a.sharding.spec)  # noqa: E731
    lead = ("pipeline",) if P > 1 else ()
    assert tp(attn["q"]["kernel"])[:len(lead) + 2] == lead + (None, "tensor")
    assert tp(attn["o"]["kernel"])[:len(lead) + 1] == lead + ("tensor",)
    assert tp(blk["mlp"]["wi"]["kernel"])[:len(lead) + 2] == lead + (None, "tensor")
    assert tp(blk["mlp"]["wo"]["kernel"])[:len(lead) + 1] == lead + ("tensor",)
    assert tp(p["embed"]["tokens"])[0] == "tensor"
    if which == "gpt2_untied":
        assert p["embed"]["tokens"].shape[0] == 212 and llm.engine.cfg.valid_vocab_size == 211   # padded, not refused


def test_pipelined_step_moves_activations_not_weights(gpt2_untied):
    llm = _llm(gpt2_untied, 2, 2, max_beam_width=2)
    eng = llm.engine
    st = eng.init_state()
    # beam search reorders the pipelined cache rows too: the same beams as one device
    one = _llm(gpt2_untied, max_beam_width=2)
    kw = dict(max_new_tokens=5, end_id=None, beam_width=2)
    assert llm.generate(PROMPTS[:1], **kw).beams == one.generate(PROMPTS[:1], **kw).beams
    hlo = eng._generate.lower(eng.params, st, np.int32(0), rem=4, chunked=False, beam=True).compile().as_text()
    assert "collective-permute" in hlo
    # A stage's weights are [P=2, ...] globally, [1, ...] per device: an all-gather producing any
    # stacked weight's global shape would be another stage's weights arriving.
    assert_no_stage_all_gather(hlo, eng.params["stages"])
    pre = jax.jit(eng._prefill_fn).lower(eng.params, np.zeros((4, 16), np.int32), np.ones((4,), np.int32),
                             eng._pack([], 4)).compile().as_text()
    assert "collective-permute" in pre


@pytest.mark.parametrize("T,P,msg", [
    (3, 1, "tensor_parallel=3 does not divide the model's 8 attention heads"),
    (1, 3, "pipeline_parallel=3 does not divide the model's 4 layers"),
    (16, 1, "tensor_parallel=16 x pipeline_parallel=1 = 16 devices, but only 8"),
])
def test_bad_layouts_name_the_numbers(gpt2_untied, T, P, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        ftjax.load(gpt2_untied, dtype="float32", attention="xla", tensor_parallel=T, pipeline_parallel=P)


def test_kv_heads_neither_multiple_nor_divisor():
    from ftjax.config import ModelConfig
    from ftjax.sharding.mesh import check_layout

    cfg = ModelConfig(vocab_size=64, hidden=96, num_layers=2, num_heads=12, num_kv_heads=3, ffn_dim=64,
                      max_positions=32)
    with pytest.raises(ValueError, match="tensor_parallel=4: the model's 3 kv heads"):
        check_layout(cfg, 4, 1)


def test_t5_pipeline_layers_must_divide(t5_dir):
    """T5 pipelines (tests/test_sharding_t5.py) when P divides its encoder and decoder layers."""
    with pytest.raises(ValueError, match=re.escape("pipeline_parallel=4 does not divide the model's 2 encoder layers")):
        ftjax.load(t5_dir, dtype="float32", attention="xla", pipeline_parallel=4)


def test_different_local_device_counts_refused():
    from ftjax.sharding import mesh as M

    class D:
        def __init__(self, p, i):
            self.process_index, self.id, self.platform = p, i, "cpu"

    with pytest.raises(ValueError, match="process 0: 2, process 1: 1"):
        M._check_hosts([D(0, 0), D(0, 1), D(1, 2)])


def test_int8_weights_follow_the_rule_table(gpt2_untied):
    """Weight-only int8 on T=2 x P=2: q sharded like the float kernel, scale like its output dims."""
    kw = dict(dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32, max_beam_width=1, quantize="int8")
    ref = ftjax.load(gpt2_untied, **kw).generate(PROMPTS, max_new_tokens=6, end_id=None).tokens
    llm = ftjax.load(gpt2_untied, tensor_parallel=2, pipeline_parallel=2, **kw)
    wi = llm.engine.params["stages"][0]["mlp"]["wi"]["kernel"]
    assert tuple(wi.q.sharding.spec) == ("pipeline", None, "tensor") and tuple(wi.scale.sharding.spec) == ("pipeline", "tensor")
    assert llm.generate(PROMPTS, max_new_tokens=6, end_id=None).tokens == ref


def test_int8_embedding_table_shards_and_pads():
    """Mode "int8-embed" (the tied head is the int8 table) on T=2 x P=2 with the vocabulary padded for T:
    the tokens of the single-device engine; the table's rows and scales split over `tensor`."""
    from ftjax import quantize as Q
    from ftjax.config import ModelConfig
    from ftjax.models import gpt
    from ftjax.sharding.mesh import make_mesh

    cfg = ModelConfig(vocab_size=301, max_positions=64, hidden=64, num_layers=4, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1)
    p = Q.quantize_params(gpt.init_params(cfg, seed=int(np.random.randint(1000))), cfg, mode="int8-embed")
    kw = dict(dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32, max_beam_width=1)
    ref = ftjax.LLM(cfg, p, **kw).generate(PROMPTS, max_new_tokens=6, end_id=None, return_log_probs=True)
    llm = ftjax.LLM(cfg, p, mesh=make_mesh(tensor=2, pipeline=2), **kw)
    t = llm.engine.params["embed"]["tokens"]
    assert isinstance(t, Q.QuantizedWeightT) and t.qt.shape == (302, 64)
    assert tuple(t.qt.sharding.spec)[:1] == ("tensor",) and tuple(t.scale.sharding.spec) == ("tensor",)
    got = llm.generate(PROMPTS, max_new_tokens=6, end_id=None, return_log_probs=True)
    assert got.tokens == ref.tokens
    np.testing.assert_allclose(np.asarray(got.output_log_probs), np.asarray(ref.output_log_probs), atol=1e-4)


def test_transposed_int8_weights_shard_and_pad():
    """QuantizedWeightT (int8 stored [*out, *in]) on T=2 x P=2, vocab padded for T (its lm_head too): the
    tokens of the single-device plain-int8 engine; q's axes follow its transposed layout."""
    from ftjax import quantize as Q
    from ftjax.config import ModelConfig
    from ftjax.models import gpt
    from ftjax.sharding.mesh import make_mesh

    cfg = ModelConfig(vocab_size=301, max_positions=64, hidden=64, num_layers=4, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, tie_embeddings=False)
    p = gpt.init_params(cfg, seed=int(np.random.randint(1000)))
    kw = dict(dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32, max_beam_width=1)
    ref = ftjax.LLM(cfg, Q.quantize_params(p, cfg), **kw).generate(PROMPTS, max_new_tokens=6, end_id=None).tokens
    llm = ftjax.LLM(cfg, Q.quantize_params(p, cfg, transposed=True), mesh=make_mesh(tensor=2, pipeline=2), **kw)
    # XLA's dots on a mesh: the engine's "auto" layout is the plain one; "nk" transposes the placed weights
    # (each dim keeps its mesh axes)
    assert isinstance(llm.engine.params["stages"][0]["mlp"]["wi"]["kernel"], Q.QuantizedWeight)
    assert llm.generate(PROMPTS, max_new_tokens=6, end_id=None).tokens == ref
    llm.engine.int8_layout = "nk"
    wi = llm.engine.params["stages"][0]["mlp"]["wi"]["kernel"]
    assert isinstance(wi, Q.QuantizedWeightT)
    assert tuple(wi.qt.sharding.spec) == ("pipeline", "tensor", None) and tuple(wi.scale.sharding.spec) == ("pipeline", "tensor")
    assert llm.generate(PROMPTS, max_new_tokens=6, end_id=None).tokens == ref
    # and back: the same placement as the plain tree got at construction
    llm.engine.int8_layout = "kn"
    wk = llm.engine.params["stages"][0]["mlp"]["wi"]["kernel"]
    assert isinstance(wk, Q.QuantizedWeight) and tuple(wk.q.sharding.spec) == ("pipeline", None, "tensor")
    assert llm.generate(PROMPTS, max_new_tokens=6, end_id=None).tokens == ref
