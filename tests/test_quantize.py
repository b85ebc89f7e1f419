"""INT8 weight-only quantization: the quantizer, the linear op on int8 weights, an int8 model against its
float32 twin (logits, greedy tokens, top-1 / KL report), device memory, the convert CLI and orbax round
trip, beam search and sampling on int8 weights, and the dequantisation buffer in the compiled step."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import quantize as Q
from ftjax.config import ModelConfig
from ftjax.layers.linear import QuantizedWeight, QuantizedWeightT, linear
from ftjax.llm import LLM
from ftjax.models import gpt

GPT_CFG = ModelConfig(vocab_size=256, hidden=128, num_layers=3, num_heads=4, ffn_dim=512, max_positions=64,
                      bos_id=0, eos_id=None)
LLAMA_CFG = ModelConfig(vocab_size=256, hidden=128, num_layers=2, num_heads=8, num_kv_heads=2, ffn_dim=384,
                        max_positions=64, activation="silu", gated_ffn=True, norm="rmsnorm", position="rotary",
                        tie_embeddings=False, attn_bias=False, mlp_bias=False, bos_id=0, eos_id=None)


def _params(cfg, seed=0):
    """Random params, scaled up so that the tiny model has confident (non-tied) next-token logits."""
    p = gpt.init_params(cfg, seed)
    return jax.tree.map(lambda a: np.asarray(a) * (2.0 if a.ndim >= 2 else 1.0), p)


def _prompts(seed, n, lo, hi, vocab=256):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, size=rng.randint(lo, hi + 1)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    """(float32 LLM, int8 LLM) over the same random LLaMA-style weights (GQA, SwiGLU, untied head)."""
    p = _params(LLAMA_CFG, 3)
    fp = LLM(LLAMA_CFG, p, dtype="float32", max_batch_size=4, max_seq_len=64)
    q = LLM(LLAMA_CFG, Q.quantize_params(p, LLAMA_CFG), dtype="float32", max_batch_size=4, max_seq_len=64)
    return fp, q


# ------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("shape,n_in", [((64, 48), 1), ((32, 4, 8), 1), ((4, 8, 32), 2), ((5, 3), 1)])
@pytest.mark.parametrize("on_device", [False, True])
def test_quantizer_round_trip(shape, n_in, on_device):
    rng = np.random.RandomState(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, size=shape[n_in:])).astype(np.float32)
    w.reshape(int(np.prod(shape[:n_in])), -1)[:, 0] = 0.0            # an all-zero output channel
    qw = Q.quantize_weight(jnp.asarray(w) if on_device else w, n_in)
    q, s = np.asarray(qw.q), np.asarray(qw.scale)
    assert q.dtype == np.int8 and q.shape == shape and s.shape == shape[n_in:] and s.dtype == np.float32
    assert np.abs(q.astype(np.int32)).max() <= 127
    err = np.abs(w - q.astype(np.float32) * s)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-12), f"max err/scale {np.max(err / s):.4f}"
    # the largest weight of each channel is hit exactly (symmetric, amax -> +-127)
    amax = np.abs(w).reshape(-1, *shape[n_in:]).max(0)
    np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(Q.dequantize(qw)), q * s, rtol=1e-6)


def test_linear_consumes_quantized_weight():
    rng = np.random.RandomState(1)
    w = rng.standard_normal((4, 8, 32)).astype(np.float32)            # o-projection layout [n, h, d]
    x = rng.standard_normal((3, 4, 8)).astype(np.float32)
    qw = Q.quantize_weight(w, 2)
    ref = np.einsum("bnh,nhd->bd", x, np.asarray(Q.dequantize(qw)))
    np.testing.assert_allclose(np.asarray(linear(x, qw, 2)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_dequantised_path(monkeypatch, transposed):
    """Calls of at least INT8_DEQUANT_ROWS rows dequantise the weight before a plain GEMM: the same product as
    the dequantised float32 reference (float32 out), within bf16 rounding for a 16-bit product."""
    import ftjax.layers.linear as L

    rng = np.random.RandomState(2)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    x = rng.standard_normal((2, 9, 48)).astype(np.float32)
    qw = Q.quantize_weight(w, 1)
    if transposed:
        qw = QuantizedWeightT(jnp.asarray(qw.q).T, qw.scale)
    ref = x @ np.asarray(Q.dequantize(Q.quantize_weight(w, 1)))
    monkeypatch.setattr(L, "INT8_DEQUANT_ROWS", 18)
    np.testing.assert_allclose(np.asarray(linear(x, qw)), ref, rtol=1e-5, atol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = np.asarray(linear(xb, qw, out_dtype=jnp.bfloat16), np.float32)
    np.testing.assert_allclose(got, np.asarray(xb, np.float32) @ np.asarray(Q.dequantize(Q.quantize_weight(w, 1))),
                               rtol=3e-2, atol=3e-2)
    hlo = jax.jit(lambda a: linear(a, qw)).lower(x).as_text()
    assert hlo.count("optimization_barrier") == 2   # x tied to the int8 values; the dequantised copy
    monkeypatch.setattr(L, "INT8_DEQUANT_ROWS", 19)                  # 18 rows: the fused path
    assert jax.jit(lambda a: linear(a, qw)).lower(x).as_text().count("optimization_barrier") == 1


def test_quantize_params_swaps_only_projections():
    p = _params(LLAMA_CFG)
    qp = Q.quantize_params(p, LLAMA_CFG)
    flat = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(qp, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]}
    quantized = sorted(k for k, v in flat.items() if isinstance(v, QuantizedWeight))
    assert len(quantized) == LLAMA_CFG.num_layers * 7 + 1              # q k v o wi wg wo per layer + lm_head
    for k, v in flat.items():
        if isinstance(v, QuantizedWeight):
            assert k.endswith("['kernel']") and any(f"['{n}']" in k for n in Q.PROJECTIONS + ("lm_head",)), k
        else:
            assert v.dtype == np.float32, k                            # embeddings, norms stay float
    assert "['lm_head']" not in "".join(k for k, v in flat.items() if not isinstance(v, QuantizedWeight))
    assert not isinstance(Q.quantize_params(p, LLAMA_CFG, lm_head=False)["lm_head"]["kernel"], QuantizedWeight)
    # idempotent, and structure-compatible with check_params
    assert jax.tree.structure(Q.quantize_params(qp)) == jax.tree.structure(qp)
    from ftjax.checkpoint.common import check_params
    check_params(LLAMA_CFG, qp, "test")


def test_transposed_layout():
    """QuantizedWeightT holds the same values stored [*out, *in]: the linear op gives the same result, the
    tree converts both ways, storage and checkpoint checks see the untransposed weight, logical axes follow."""
    p = _params(LLAMA_CFG, 5)
    qp = Q.quantize_params(p, LLAMA_CFG)
    tp = Q.quantize_params(p, LLAMA_CFG, transposed=True)
    is_q = lambda x: isinstance(x, (QuantizedWeight, QuantizedWeightT))  # noqa: E731
    lq = jax.tree.leaves(qp, is_leaf=is_q)
    lt = jax.tree.leaves(tp, is_leaf=is_q)
    assert sum(isinstance(v, QuantizedWeightT) for v in lt) == sum(isinstance(v, QuantizedWeight) for v in lq) > 0
    assert jax.tree.structure(Q.quantize_params(qp, transposed=True)) == jax.tree.structure(tp)
    assert jax.tree.structure(Q.quantize_params(tp)) == jax.tree.structure(qp)
    # set_int8_layout converts only what is quantized (float leaves stay, nothing new is quantized)
    assert jax.tree.structure(Q.set_int8_layout(qp, True)) == jax.tree.structure(tp)
    assert jax.tree.structure(Q.set_int8_layout(tp, False)) == jax.tree.structure(qp)
    assert jax.tree.structure(Q.set_int8_layout(p, True)) == jax.tree.structure(p)
    dev = Q.set_int8_layout(jax.tree.map(jnp.asarray, qp), True)
    for a, b in zip(jax.tree.leaves(dev), jax.tree.leaves(tp)):
        assert isinstance(a, jax.Array)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(lq, lt):
        if isinstance(a, QuantizedWeight):
            assert b.shape == a.shape and b.qt.shape == b.shape[-len(a.scale.shape):] + b.shape[:-len(a.scale.shape)]
            np.testing.assert_array_equal(np.asarray(Q.dequantize(b)), np.asarray(Q.dequantize(a)))
    rng = np.random.RandomState(2)
    for w, n_in in [(rng.standard_normal((4, 8, 32)).astype(np.float32), 2), (rng.standard_normal((32, 48)), 1)]:
        qw = Q.quantize_weight(w, n_in)
        x = rng.standard_normal((3,) + w.shape[:n_in]).astype(np.float32)
        for qq in (Q.transpose_quantized(qw), Q.transpose_quantized(Q.quantize_weight(jnp.asarray(w), n_in))):
            np.testing.assert_allclose(np.asarray(linear(x, qq, n_in)), np.asarray(linear(x, qw, n_in)),
                                       rtol=1e-5, atol=1e-5)
    st, sq = Q.to_storage(tp), Q.to_storage(qp)
    assert jax.tree.structure(st) == jax.tree.structure(sq)
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(sq)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from ftjax.checkpoint.common import check_params
    check_params(LLAMA_CFG, tp, "test")


def _dequantized(params):
    """The float32 twin of a quantized tree: every int8 leaf replaced by its values times its scales."""
    def f(path, x):
        if isinstance(x, QuantizedWeightT) and Q._is_table(path):
            return np.asarray(x.qt, np.float32) * np.asarray(x.scale, np.float32)[:, None]
        if isinstance(x, (QuantizedWeight, QuantizedWeightT)):
            return np.asarray(Q.dequantize(x), np.float32)
        return x
    return jax.tree_util.tree_map_with_path(f, params, is_leaf=lambda x: isinstance(x, (QuantizedWeight, QuantizedWeightT)))


def test_int8_embedding_table():
    """Mode "int8-embed": the token embedding becomes int8 rows with one scale each (numpy and on-device
    quantizers agree, error <= scale / 2); the model equals its float32 twin built from the dequantized
    values (lookup and tied head alike), the engine keeps it int8 in either layout of the other weights,
    and the device bytes drop below plain int8's."""
    seed = int(np.random.randint(1000))
    cfg = dataclasses.replace(GPT_CFG, vocab_size=311)
    p = _params(cfg, seed)
    w = p["embed"]["tokens"]
    t = Q.quantize_rows(w)
    assert isinstance(t, QuantizedWeightT) and t.qt.dtype == np.int8 and t.qt.shape == w.shape and t.scale.shape == w.shape[:1]
    assert np.all(np.abs(w - t.qt * t.scale[:, None]) <= t.scale[:, None] / 2 + 1e-7)
    td = Q.quantize_rows(jnp.asarray(w))
    # on the device: the same scales, and values that may round the other way at an exact half (a last-bit
    # difference of the division)
    np.testing.assert_allclose(np.asarray(td.scale), t.scale, rtol=1e-6)
    diff = np.abs(np.asarray(td.qt, np.int32) - t.qt)
    assert diff.max() <= 1 and diff.mean() < 1e-3
    assert Q.quantize_rows(jax.ShapeDtypeStruct(w.shape, jnp.float32)).qt.shape == w.shape
    with pytest.raises(ValueError, match="vocab"):
        Q.quantize_rows(np.zeros((2, 3, 4)))
    qp = Q.quantize_params(p, cfg, mode="int8-embed")
    np.testing.assert_array_equal(qp["embed"]["tokens"].qt, t.qt)
    assert isinstance(qp["embed"]["positions"], np.ndarray)                     # position table stays float
    assert isinstance(Q.quantize_params(p, cfg)["embed"]["tokens"], np.ndarray)  # plain int8 keeps it float
    # the layout of the other int8 weights never touches the table
    for tr in (False, True):
        assert isinstance(Q.set_int8_layout(qp, tr)["embed"]["tokens"], QuantizedWeightT)
    twin = LLM(cfg, _dequantized(qp), dtype="float32", max_batch_size=2, max_seq_len=48)
    q = LLM(cfg, qp, dtype="float32", max_batch_size=2, max_seq_len=48)
    assert isinstance(q.engine.params["embed"]["tokens"], QuantizedWeightT)
    assert q.engine.params["embed"]["tokens"].qt.dtype == jnp.int8
    prompts = _prompts(seed, 3, 4, 20, vocab=cfg.vocab)
    a, b = twin.logits(prompts), q.logits(prompts)
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4 * np.abs(a).max())
    ga = twin.generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    gb = q.generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    np.testing.assert_allclose(np.asarray(gb.output_log_probs[0][:1]), np.asarray(ga.output_log_probs[0][:1]), atol=1e-3)
    nb = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    plain = LLM(cfg, Q.quantize_params(p, cfg), dtype="bfloat16", max_batch_size=1, max_seq_len=32)
    emb = LLM(cfg, qp, dtype="bfloat16", max_batch_size=1, max_seq_len=32)
    assert nb(emb.engine.params) < nb(plain.engine.params) - cfg.vocab_size * cfg.hidden // 2
    # GPT 1.3B: int8 weights with the int8 table, from abstract shapes
    gpt13 = ModelConfig(vocab_size=50257, hidden=2048, num_layers=24, num_heads=16, ffn_dim=8192, max_positions=2048)
    shapes, _ = gpt.abstract_params(gpt13, jnp.bfloat16)
    r = [Q.param_bytes(Q.quantize_params(shapes, gpt13, mode=m, scale_dtype=jnp.bfloat16)) / Q.param_bytes(shapes)
         for m in ("int8", "int8-embed")]
    assert r[1] < r[0] - 0.03 and r[1] <= 0.52, r


# --------------------------------------------------------------------------------- model accuracy
def test_int8_logits_close_to_float(pair):
    fp, q = pair
    prompts = _prompts(0, 4, 5, 30)
    a, b = fp.logits(prompts), q.logits(prompts)
    for i, p in enumerate(prompts):
        x, y = a[i, : len(p)], b[i, : len(p)]
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        # ~0.7% relative error per int8 projection (Gaussian weights, amax ~ 3 sigma), compounding over
        # ~11 projections in series here and amplified by the 2x-scaled weights: ~3.5% observed.
        assert rel < 0.06, f"prompt {i}: relative logit error {rel:.4f}"
    rep = Q.int8_accuracy(fp, q, prompts)
    assert rep["positions"] == sum(map(len, prompts))
    assert rep["top1"] >= 0.85 and rep["kl"] < 0.01, rep


def test_int8_greedy_mostly_agrees(pair):
    fp, q = pair
    prompts = _prompts(1, 4, 4, 12)
    ra = fp.generate(prompts, max_new_tokens=12, end_id=None)
    rb = q.generate(prompts, max_new_tokens=12, end_id=None)
    # Compare up to the first divergence of each row (after it, the rows continue different prefixes).
    agree = []
    for x, y in zip(ra.tokens, rb.tokens):
        n = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        agree.append(n / len(x))
    assert np.mean(agree) >= 0.6 and max(agree) == 1.0, (ra.tokens, rb.tokens)


def test_engine_keeps_int8_and_memory(pair, monkeypatch):
    _, q = pair
    leaves = jax.tree.leaves(q.engine.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    qws = [x for x in leaves if isinstance(x, QuantizedWeight)]
    assert qws and all(x.q.dtype == jnp.int8 and isinstance(x.q, jax.Array) for x in qws)
    with pytest.raises(ValueError, match="int8_layout"):
        q.engine.int8_layout = "rows"
    assert q.engine.int8_layout == "auto"
    # int8 weights: the prefill's GEMMs compile without the cuBLAS fallback (XLA's Triton GEMMs convert int8
    # in their tiles); float weights keep XLA's default; the int8 engine compiled and ran its admit with it
    q.generate([[3, 4, 5]], max_new_tokens=2)
    assert q.engine.admit_options.get("xla_gpu_cublas_fallback") is False and q.engine._admit._cache_size() >= 1
    assert "xla_gpu_cublas_fallback" not in pair[0].engine.admit_options
    # Prefills of INT8_DEQUANT_ROWS rows and more (weights dequantised before plain GEMMs) take the admit
    # compiled with XLA's default options; below, the Triton one; the tokens are the same either way
    import ftjax.layers.linear as L

    prompts = [[3, 4, 5, 6, 7], [9, 8]]
    small = q.generate(prompts, max_new_tokens=3).tokens
    n_small, n_big = q.engine._admit._cache_size(), q.engine._admit_big._cache_size()
    monkeypatch.setattr(L, "INT8_DEQUANT_ROWS", 2)
    big = q.generate(prompts, max_new_tokens=3).tokens
    monkeypatch.undo()
    assert q.engine._admit_big._cache_size() == n_big + 1 and q.engine._admit._cache_size() == n_small
    assert big == small and pair[0].engine._admit_big is None
    # Device bytes: int8 <= 0.55x bf16 of the same model (embedding share here ~ a 1.3B GPT's)
    cfg = dataclasses.replace(GPT_CFG, hidden=256, num_layers=4, ffn_dim=1024)
    p = _params(cfg)
    bf = LLM(cfg, p, dtype="bfloat16", max_batch_size=1, max_seq_len=32)
    i8 = LLM(cfg, Q.quantize_params(p, cfg), dtype="bfloat16", max_batch_size=1, max_seq_len=32)
    nb = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    ratio = nb(i8.engine.params) / nb(bf.engine.params)
    assert ratio <= 0.55, ratio
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(i8.engine.params))
    # The published shapes, from abstract shapes (nothing allocated): 1.3B GPT and LLaMA-3-8B.
    gpt13 = ModelConfig(vocab_size=50257, hidden=2048, num_layers=24, num_heads=16, ffn_dim=8192, max_positions=2048)
    llama8 = dataclasses.replace(LLAMA_CFG, vocab_size=128256, hidden=4096, num_layers=32, num_heads=32,
                                 num_kv_heads=8, ffn_dim=14336, max_positions=8192)
    for c in (gpt13, llama8):
        shapes, _ = gpt.abstract_params(c, jnp.bfloat16)
        r = Q.param_bytes(Q.quantize_params(shapes, c, scale_dtype=jnp.bfloat16)) / Q.param_bytes(shapes)
        assert r <= 0.55, (c.hidden, r)


# ------------------------------------------------------------------------------ decoding on int8
def test_int8_beam_search_and_sampling(pair):
    fp, q = pair
    prompts = _prompts(2, 2, 4, 9)
    rb = q.generate(prompts, max_new_tokens=6, beam_width=2, end_id=None, return_log_probs=True)
    assert [len(t) for t in rb.tokens] == [6, 6] and all(len(b) == 2 for b in rb.beams)
    assert all(np.isfinite(c) for c in rb.cum_log_probs)
    rs1 = q.generate(prompts, max_new_tokens=6, top_k=8, temperature=0.8, random_seed=7, end_id=None)
    rs2 = q.generate(prompts, max_new_tokens=6, top_k=8, temperature=0.8, random_seed=7, end_id=None)
    assert rs1.tokens == rs2.tokens and all(len(t) == 6 for t in rs1.tokens)
    assert all(0 <= t < LLAMA_CFG.vocab_size for row in rs1.tokens for t in row)
    rp = q.generate(prompts, max_new_tokens=6, top_p=0.9, random_seed=3, end_id=None)
    assert all(len(t) == 6 for t in rp.tokens)


# --------------------------------------------------------------------------- checkpoint round trip
def test_convert_cli_int8_round_trip(tmp_path):
    from conftest import make_hf_gpt2
    from ftjax import convert
    from ftjax.checkpoint import orbax_io

    src, dst = str(tmp_path / "hf"), str(tmp_path / "int8")
    make_hf_gpt2(src, vocab=211, n_embd=32, n_layer=2, n_head=4, eos=None, n_positions=64)
    assert convert.main([src, dst, "--quantize", "int8"]) == 0
    with open(os.path.join(dst, orbax_io.CONFIG_FILE)) as f:
        assert json.load(f)["quantize"] == "int8"
    cfg, params = orbax_io.load(dst)
    assert params["layers_0"]["attn"]["q"]["kernel"].q.dtype == np.int8
    assert params["layers_0"]["mlp"]["wo"]["kernel"].scale.dtype == np.float32

    stored = ftjax.load(dst, dtype="float32", max_batch_size=2, max_seq_len=64)   # int8 as stored
    onload = ftjax.load(src, dtype="float32", max_batch_size=2, max_seq_len=64, quantize="int8")
    ref = ftjax.load(src, dtype="float32", max_batch_size=2, max_seq_len=64)
    assert isinstance(stored.engine.params["layers_1"]["mlp"]["wi"]["kernel"], QuantizedWeight)
    ids = _prompts(4, 2, 5, 11, vocab=211)
    a, b, c = stored.logits(ids), onload.logits(ids), ref.logits(ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)             # same quantization either way
    assert np.linalg.norm(a - c) / np.linalg.norm(c) < 0.05
    # bf16 storage keeps int8 values, scales in bf16
    dst16 = str(tmp_path / "int8_bf16")
    assert convert.main([dst, dst16, "--dtype", "bfloat16", "--quantize", "int8"]) == 0
    _, p16 = orbax_io.load(dst16)
    k = p16["layers_0"]["attn"]["o"]["kernel"]
    np.testing.assert_array_equal(k.q, params["layers_0"]["attn"]["o"]["kernel"].q)
    assert k.scale.dtype.name == "bfloat16"
    with pytest.raises(ValueError, match="quantize"):
        ftjax.load(src, quantize="int4")
    # with the embedding table: stored as int8 rows [v, d], read back as the table
    dste = str(tmp_path / "int8e")
    assert convert.main([src, dste, "--quantize", "int8-embed"]) == 0
    _, pe = orbax_io.load(dste)
    te = pe["embed"]["tokens"]
    assert isinstance(te, QuantizedWeightT) and te.qt.dtype == np.int8 and te.qt.shape == (211, 32)
    stored_e = ftjax.load(dste, dtype="float32", max_batch_size=2, max_seq_len=64)
    onload_e = ftjax.load(src, dtype="float32", max_batch_size=2, max_seq_len=64, quantize="int8-embed")
    d = stored_e.logits(ids)
    np.testing.assert_allclose(d, onload_e.logits(ids), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(d - c) / np.linalg.norm(c) < 0.05 and not np.allclose(d, a, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- no bf16 copy of the weights
def _entry_uses_of_int8_params(hlo: str) -> list[str]:
    """Instructions of the ENTRY computation (outside the while loop) that read an int8 parameter,
    other than passing it into the loop."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[: entry.index("\n}\n")].splitlines()[1:]
    s8 = {ln.split("=")[0].strip().lstrip("%") for ln in entry if "parameter(" in ln and "= s8[" in ln}
    assert s8, "no int8 parameters found in the entry computation"
    return [ln.strip()[:160] for ln in entry if "parameter(" not in ln and " tuple(" not in ln
            and " while(" not in ln and any(f"%{n}" in ln.split("=", 1)[1] for n in s8)]


def test_decode_loop_keeps_dequantisation_inside_the_loop():
    """N decode steps in a while loop (as the engine runs them). The int8 weights are loop-invariant:
    unguarded, XLA's loop-invariant code motion hoists `convert(q)` out of the loop and keeps a
    dequantised copy of every weight alive for the whole loop. linear() ties q to the activations, so
    no int8 weight is read outside the loop, and the program's temporaries are no larger than the
    bf16 model's. (On XLA:CPU each dot still converts its operand into a scratch buffer — the bf16
    model does the same — on GPU the convert is expected inside the GEMM fusion; bench/e2e.py reports
    the compiled temporaries there.)"""
    from ftjax.models.families import GPTFamily

    cfg = dataclasses.replace(GPT_CFG, hidden=256, num_layers=3, ffn_dim=1024, vocab_size=128)
    p = _params(cfg)
    fam = GPTFamily(cfg, jnp.bfloat16, "xla")
    cache = fam.init_cache(1, 32)

    def loop(params, cache):
        def body(i, c):
            tok, cache = c
            logits, cache = fam.decode(params, tok, jnp.full((1,), i, jnp.int32), cache)
            return jnp.argmax(logits, -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, 4, body, (jnp.zeros((1,), jnp.int32), cache))

    temp = {}
    for name, params in [("bf16", p), ("int8", Q.quantize_params(p, cfg))]:
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16) if a.dtype.kind == "f" else jnp.asarray(a),
                              params)
        compiled = jax.jit(loop).lower(params, cache).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
        if name == "int8":
            hoisted = _entry_uses_of_int8_params(compiled.as_text())
            assert not hoisted, f"int8 weights dequantised outside the decode loop: {hoisted[:3]}"
    assert temp["int8"] <= temp["bf16"] + 64 * 1024, temp


def test_int8_embedding_on_t5(tmp_path):
    """T5 v1.0 (the tied head reads the shared table, scaled by d^-0.5) with mode "int8-embed": the
    encoder, decoder and head all read the int8 rows, and the model equals its float32 twin."""
    from ftjax.checkpoint import load_checkpoint
    from tests.test_t5 import make_hf_t5

    path = str(tmp_path / "t5")
    make_hf_t5(path, seed=int(np.random.randint(100)))
    cfg, p = load_checkpoint(path)
    qp = Q.quantize_params(p, cfg, mode="int8-embed")
    assert isinstance(qp["embed"]["tokens"], QuantizedWeightT)
    kw = dict(dtype="float32", attention="xla", max_batch_size=2, max_seq_len=24)
    q, twin = LLM(cfg, qp, **kw), LLM(cfg, _dequantized(qp), **kw)
    rng = np.random.RandomState(int(np.random.randint(1000)))
    enc = [rng.randint(2, 131, size=n).tolist() for n in (5, 9)]
    dec = [[0] + rng.randint(2, 131, size=4).tolist() for _ in range(2)]
    a, b = twin.logits(enc, dec), q.logits(enc, dec)
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4 * np.abs(a).max())
    assert [len(t) for t in q.generate(enc, max_new_tokens=4, end_id=None).tokens] == [4, 4]
