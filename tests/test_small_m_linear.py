"""The decode step's projections through the Pallas small-M kernel (interpreted on CPU) against the same
engine on XLA's dots: same tokens and log probs, for a GPT-2-like and a LLaMA-like model (GQA, SwiGLU,
untied head), float32 and INT8 weight-only; the kernel is really in the compiled step (one launch for
q/k/v, one for gate/up). With the kernel on, the step takes the fused path by default (split-K partials
summed by the add + statistics kernel, the normalising projection and the attention kernel that writes
the new K/V); its other norm placements and the unfused path are checked too."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import ftjax
from ftjax import quantize as Q
from ftjax.config import ModelConfig
from ftjax.models import gpt

SHAPES = {
    "gpt2": dict(),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


def _llm(cfg, params, small_m, fuse=True, int8_layout="auto"):
    llm = ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_batch_size=3, max_seq_len=48)
    llm.engine.int8_layout = int8_layout
    llm.engine.small_m = small_m
    llm.engine.fuse_decode = fuse
    return llm


def _int8_leaves(params):
    return [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, (Q.QuantizedWeight, Q.QuantizedWeightT)))
            if isinstance(x, (Q.QuantizedWeight, Q.QuantizedWeightT))]


# float weights on the GPT-2 shape, plain int8 on the LLaMA one (its rotary / GQA / gated / RMSNorm parts of the
# fused path are the same code for float and int8 weights); both shapes for the two engine defaults (suite time)
@pytest.mark.parametrize("family,int8", [("gpt2", False), ("llama", True)] +
                         [(f, m) for f in sorted(SHAPES) for m in ("transposed", "embed")])
def test_decode_with_small_m_kernel_matches_xla(family, int8):
    """int8=True: the kernel reads the plain layout (int8_layout="kn"); int8="transposed": the engine's
    default with the kernel on, QuantizedWeightT (q stored [*out, *in]), whether the tree came in
    transposed or not; "embed": the engine's default on mode "int8-embed" (the tied head of the GPT-2-like
    model is the int8 table, through the kernel). The reference is XLA on the plain QuantizedWeight tree,
    and XLA on the transposed tree is held to it too."""
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES[family])
    params = gpt.init_params(cfg, seed=seed % 1000)
    if int8:
        params = Q.quantize_params(params, cfg, mode="int8-embed" if int8 == "embed" else "int8")
    kparams = Q.quantize_params(params, cfg, transposed=True) if int8 == "transposed" else params
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(3, 7))]
    res = {}
    runs = [("xla", params, False, "auto"), ("kernel", kparams, True, "kn" if int8 is True else "auto")]
    if int8 == "embed":
        assert isinstance(params["embed"]["tokens"], Q.QuantizedWeightT)
    if int8 == "transposed":
        runs += [("xla_t", kparams, False, "nk"), ("kernel_auto", params, True, "auto")]
    for name, p, small_m, layout in runs:
        llm = _llm(cfg, p, small_m, int8_layout=layout)
        if int8:
            want = Q.QuantizedWeightT if (layout == "nk" or (layout == "auto" and small_m)) else Q.QuantizedWeight
            leaves = _int8_leaves({k: v for k, v in llm.engine.params.items() if k != "embed"})
            assert all(isinstance(w, want) for w in leaves), (name, want)
            assert isinstance(llm.engine.params["embed"]["tokens"], Q.QuantizedWeightT if int8 == "embed" else jax.Array)
        res[name] = llm.generate(prompts, max_new_tokens=6, end_id=None, return_log_probs=True)
    for name in set(res) - {"xla"}:
        assert res[name].tokens == res["xla"].tokens, f"{name}: seed {seed}"
        np.testing.assert_allclose(np.asarray(res[name].output_log_probs, np.float32),
                                   np.asarray(res["xla"].output_log_probs, np.float32), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fuse", ["norm", "stats2", False])
def test_fused_decode_variants_match_xla(fuse):
    """The fused decode path's other norm placements (one add+norm kernel; statistics + normalise kernel)
    and the unfused small-M path give XLA's tokens and log probs (the default, "stats", is tested above)."""
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1)
    params = gpt.init_params(cfg, seed=seed % 1000)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(3, 7))]
    ref = _llm(cfg, params, False).generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    got = _llm(cfg, params, True, fuse).generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    assert got.tokens == ref.tokens, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(got.output_log_probs, np.float32),
                               np.asarray(ref.output_log_probs, np.float32), atol=2e-4, rtol=1e-4)


def _step_jaxpr(eng) -> str:
    """The jaxpr of one greedy decode step of `eng` (no chunking, no beam)."""
    return str(jax.make_jaxpr(lambda s: eng._generate_fn(eng.params, s, 0, rem=1, chunked=False, beam=False,
                                                         sampled=False))(eng.init_state()))


def test_kernel_is_in_the_decode_step_once_per_projection_group():
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES["llama"])
    eng = _llm(cfg, gpt.init_params(cfg), True).engine
    txt = _step_jaxpr(eng)
    # fused (the default): per layer q/k/v (one launch), o, gate/up (one launch), down as unreduced partials;
    # then the untied head, reduced
    assert len(re.findall(r"name=_small_linear_parts\b", txt)) == 4 * cfg.num_layers
    assert len(re.findall(r"name=_small_linear\b", txt)) == 1
    eng = _llm(cfg, gpt.init_params(cfg), True, fuse=False).engine
    txt = _step_jaxpr(eng)
    assert len(re.findall(r"name=_small_linear\b", txt)) == 4 * cfg.num_layers + 1
    # off: XLA's dots only
    eng2 = _llm(cfg, gpt.init_params(cfg), False).engine
    txt2 = _step_jaxpr(eng2)
    assert "_small_linear" not in txt2


def test_wide_batches_take_the_fused_path():
    """17..64 rows (a batch-20 decode step here) take the fused path (kernel partials, add + statistics, the
    attention kernel that writes the K/V), float and int8 weights alike; the int8 engine (the kernel with its
    scales) gives XLA's tokens and log probs; over 64 rows the step is XLA's dots."""
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES["llama"])
    params = gpt.init_params(cfg, seed=seed % 1000)
    qparams = Q.quantize_params(params, cfg)

    def engine(p, small_m, rows=20):
        llm = ftjax.LLM(cfg, p, dtype="float32", attention="pallas", max_batch_size=rows, max_seq_len=32)
        llm.engine.small_m = small_m
        return llm

    for p in (params, qparams):
        txt = _step_jaxpr(engine(p, True).engine)
        assert len(re.findall(r"name=_small_linear_parts\b", txt)) == 4 * cfg.num_layers
        assert len(re.findall(r"name=add_stats\b", txt)) == 2 * cfg.num_layers   # the final norm: add_norm
    assert "_small_linear" not in _step_jaxpr(engine(qparams, True, rows=65).engine)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(20, 5))]
    ref = engine(qparams, False).generate(prompts, max_new_tokens=3, end_id=None, return_log_probs=True)
    got = engine(qparams, True).generate(prompts, max_new_tokens=3, end_id=None, return_log_probs=True)
    assert got.tokens == ref.tokens, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(got.output_log_probs, np.float32),
                               np.asarray(ref.output_log_probs, np.float32), atol=2e-4, rtol=1e-4)


def test_norm_kernel_in_prefill_and_plain_decode_matches_xla_norms(monkeypatch):
    """With the Pallas attention, each residual add + norm of a prefill or plain-path decode step (small-M kernel
    off) of at least gpt.NORM_KERNEL_MIN_ROWS tokens is one `add_norm` kernel: not in a smaller call by default;
    with the threshold lowered it is in the compiled programs, and the tokens and log probs equal those of XLA's
    norms (NORM_KERNEL off)."""
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES["gpt2"])
    params = gpt.init_params(cfg, seed=seed % 1000)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(3, 7))]
    model = gpt.build(cfg, impl="pallas")
    tokens = np.ones((3, 7), np.int32)

    def prefill_jaxpr():
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, np.full((3,), 7, np.int32),
                                                        method=gpt.GPT.prefill))(params))

    assert gpt.NORM_KERNEL and gpt.NORM_KERNEL_MIN_ROWS > 21 and "add_norm" not in prefill_jaxpr()
    monkeypatch.setattr(gpt, "NORM_KERNEL_MIN_ROWS", 3)
    assert len(re.findall(r"name=add_norm\b", prefill_jaxpr())) == 2 * cfg.num_layers
    eng = _llm(cfg, params, False).engine
    assert len(re.findall(r"name=add_norm\b", _step_jaxpr(eng))) == 2 * cfg.num_layers + 1
    got = _llm(cfg, params, False).generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    monkeypatch.setattr(gpt, "NORM_KERNEL", False)
    eng = _llm(cfg, params, False).engine
    assert "add_norm" not in _step_jaxpr(eng)
    ref = _llm(cfg, params, False).generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    assert got.tokens == ref.tokens, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(got.output_log_probs, np.float32),
                               np.asarray(ref.output_log_probs, np.float32), atol=2e-4, rtol=1e-4)
