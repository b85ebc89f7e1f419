"""The Pallas attention kernels under tensor (x pipeline) parallel, on 8 virtual CPU devices (interpret
mode, float32): each device runs the kernels on its own heads and kv heads (ftjax/pallas/ops.py, under
shard_map), and every layout gives the greedy tokens and logits of one device; the compiled decode step
gathers neither q nor the K/V cache."""
import re

import jax
import numpy as np
import pytest

import ftjax
from ftjax.checkpoint import load_checkpoint
from ftjax.pallas import ops
from ftjax.sharding import rules as R
from ftjax.sharding.layout import OnMesh
from ftjax.sharding.mesh import attention_mesh, make_mesh
from tests.conftest import random_prompts
from tests.test_sharding import _close, write_llama_gqa
from tests.test_t5 import V, make_hf_t5

PROMPTS = random_prompts(np.random.RandomState(0), 4, 1, 14)
ENC = [np.random.RandomState(7).randint(2, V, size=n).tolist() for n in (5, 11, 3, 8)]
DEC = [[0] + e[:4] for e in ENC]


def _llm(path, T=1, P=1, **kw):
    cfg, params = load_checkpoint(path)
    mesh = make_mesh(T, P) if T * P > 1 else None
    return ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_seq_len=32, max_batch_size=4,
                     max_beam_width=1, mesh=mesh, **kw)


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    """8 heads, 2 kv heads, 2 layers: kv heads split at T=2, replicated at T=4 (rank r then uses kv head
    r // 2)."""
    return write_llama_gqa(str(tmp_path_factory.mktemp("tp_pallas_llama")), hidden=32, seed=22)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """v1.1, 4 heads, encoder 1 / decoder 1 layer, relative-position bias."""
    path = str(tmp_path_factory.mktemp("tp_pallas_t5"))
    make_hf_t5(path, proj="gated-gelu", scale=False, enc_layers=1, dec_layers=1, seed=23)
    return path


def _ref(path, t5=False, cache={}):  # noqa: B006 — one single-device Pallas reference per checkpoint
    if path not in cache:
        llm = _llm(path)
        if t5:
            cache[path] = (llm.generate(ENC, max_new_tokens=8, end_id=None).tokens, llm.logits(ENC, DEC))
        else:
            cache[path] = (llm.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens, llm.logits(PROMPTS))
    return cache[path]


@pytest.mark.parametrize("T,P", [(2, 1), (4, 1), (2, 2)])
def test_gpt_pallas_layouts_match_one_device(llama_gqa, T, P):
    """GQA at T=2 (kv heads split: 4 q heads and their kv head per rank), at T=4 (kv heads replicated:
    each rank picks the one its q heads use) and at P=2 x T=2 (the kernels inside the pipeline's
    shard_map, manual over "pipeline", run per tensor shard). MHA under TP: the T5 test."""
    toks, logits = _ref(llama_gqa)
    llm = _llm(llama_gqa, T, P)
    assert llm.engine.layout.rules["kv_heads"] == (None if T == 4 else "tensor")
    assert llm.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens == toks
    _close(llm.logits(PROMPTS), logits)


def test_t5_pallas_tensor_parallel(t5):
    toks, logits = _ref(t5, t5=True)
    llm = _llm(t5, 2)
    assert llm.generate(ENC, max_new_tokens=8, end_id=None).tokens == toks
    _close(llm.logits(ENC, DEC), logits)


def _all_gathers(hlo: str):
    """Result shapes of every all-gather in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            m = re.search(r"= \(?\w+\[([\d,]*)\]", line)
            out.append(tuple(int(x) for x in m.group(1).split(",") if x) if m else ())
    return out


def test_pallas_decode_step_gathers_no_cache(llama_gqa):
    """T=2: the compiled decode step (the engine's family on its sharded params and cache) has no
    all-gather of the K/V cache [B, k, S, h] nor of q [B, n, h] (before the kernels ran per shard, XLA
    gathered both onto every device each step); what is left gathers [B, vocab] logits at most."""
    llm = _llm(llama_gqa, 2)
    eng = llm.engine
    assert isinstance(eng.family, OnMesh) and eng.family.model is eng.model   # the layout's wrapper
    st = eng.init_state()
    kc = st.cache[0]["k"]
    assert tuple(kc.sharding.spec)[1] == "tensor"
    B, k, S, _ = kc.shape
    step = jax.jit(eng.family.decode, donate_argnums=(3,))
    tok, pos = np.ones((B,), np.int32), np.arange(B, dtype=np.int32)
    hlo = step.lower(eng.params, tok, pos, st.cache).compile().as_text()
    assert "ftjax_decode_attention" in hlo or "while" in hlo   # the kernel (interpreted on CPU) is there
    gathers = _all_gathers(hlo)
    for shape in gathers:
        assert len(shape) <= 2, f"all-gather of {shape} in the decode step (cache is {kc.shape})"
    assert not any(S in s[1:] and k in s[1:] for s in gathers)
    _, cache = step(eng.params, tok, pos, st.cache)
    assert cache[0]["k"].sharding.is_equivalent_to(kc.sharding, 4)   # the cache stays split over heads


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_ops_per_shard_gqa_bias_and_nested(kv_heads):
    """ops.attention_* alone on a T=4 mesh, against the single-device kernel: GQA / MQA with kv heads
    replicated over tensor (2 or 1 kv heads for 8 q heads), the prefill bias split over heads, and the
    same calls inside a shard_map already manual over the pipeline axis (P=2 x T=4)."""
    rng = np.random.RandomState(kv_heads)
    b, t, n, h, S = 4, 8, 8, 8, 16
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    q1, kc, vc = f(b, n, h), f(b, kv_heads, S, h), f(b, kv_heads, S, h)
    q, k, v, bias = f(b, t, n, h), f(b, t, kv_heads, h), f(b, t, kv_heads, h), f(1, n, t, t)
    lens = np.array([1, 5, 16, 9], np.int32)
    plens = np.array([8, 3, 1, 6], np.int32)

    def both(q1, kc, vc, lens, q, k, v, plens, bias):
        return (ops.attention_decode(q1, kc, vc, lens, impl="pallas"),
                ops.attention_prefill(q, k, v, plens, impl="pallas", causal=False, bias=bias),
                ops.attention_prefill(q, k, v, plens, impl="pallas", causal=True))

    args = (q1, kc, vc, lens, q, k, v, plens, bias)
    want = jax.jit(both)(*args)
    for T, P in ((4, 1), (4, 2)):
        mesh = make_mesh(T, P)
        cfg = type("Cfg", (), dict(kv_heads=kv_heads, vocab_size=64, max_positions=32))()
        rules = R.rules_for(cfg, T)
        assert rules["kv_heads"] is None
        axes = (("batch", "heads", "head_dim"), ("batch", "kv_heads", "seq", "head_dim"),
                ("batch", "kv_heads", "seq", "head_dim"), ("batch",), ("batch", None, "heads", "head_dim"),
                ("batch", None, "kv_heads", "head_dim"), ("batch", None, "kv_heads", "head_dim"), ("batch",),
                (None, "heads", None, None))
        placed = [jax.device_put(a, R.named(mesh, ax, rules)) for a, ax in zip(args, axes)]
        fn = both
        if P > 1:   # as pipeline.py: manual over "pipeline", "tensor" left to XLA, shapes local there
            fn = jax.shard_map(both, mesh=mesh, in_specs=R.manual_replicated(), out_specs=R.manual_replicated(),
                               axis_names={R.PIPELINE}, check_vma=False)
        with attention_mesh(mesh, rules):
            step = jax.jit(fn)
            got = step(*placed)
            hlo = step.lower(*placed).compile().as_text()
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
        for shape in _all_gathers(hlo):   # the K/V, the cache and q stay where they are
            assert S not in shape and n not in shape, shape
