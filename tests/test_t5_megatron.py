"""Megatron-LM T5 (`mp_rank_XX/model_optim_rng.pt`): no HF model has this architecture (biased linears,
LayerNorm with bias, learned absolute positions shared by both stacks, 1/sqrt(kv_channels) scaling, LM-head
bias), so the checkpoint is written here from random torch tensors with Megatron's own key names, fused-QKV
orderings and TP=2 split, and ftjax is compared with an independent float64 reference forward written from
those same tensors (Megatron's `t5_model.py` / `transformer.py` order: pre-LN blocks, GELU in its fused tanh
form, logits = h @ word_embeddings.T + lm_head.bias)."""
import argparse
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint import detect_format, load_checkpoint
from tests.conftest import assert_greedy_match

D, N, H, F, V, P, T = 32, 4, 8, 48, 96, 32, 2   # V: padded vocab (V/T rows per rank); P: position table rows
LE, LD, EPS = 2, 3, 1e-5


def _weights(seed=0):
    """Unsharded weights in torch [out, in] layout; q/k/v separate (fused and split when written)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    def ln():
        return {"weight": 1 + r(D, s=0.1), "bias": r(D, s=0.1)}

    def att():
        return {k: r(N * H, D) for k in ("q", "k", "v")} | {k + "b": r(N * H, s=0.1) for k in ("q", "k", "v")} | {
            "o": r(D, N * H), "ob": r(D, s=0.1)}

    def mlp():
        return {"wi": r(F, D), "wib": r(F, s=0.1), "wo": r(D, F), "wob": r(D, s=0.1)}

    w = {"wte": r(V, D, s=0.5), "wpe": r(P, D, s=0.5), "lm_bias": r(V, s=0.5),
         "encoder": [{"ln1": ln(), "att": att(), "ln2": ln(), "mlp": mlp()} for _ in range(LE)],
         "decoder": [{"ln1": ln(), "att": att(), "ln2": ln(), "cross": att(), "ln3": ln(), "mlp": mlp()}
                     for _ in range(LD)],
         "enc_final": ln(), "dec_final": ln()}
    return w


def _fuse(parts, r, version):
    """Rank r's rows of fused [parts] (each [N*H, ...]) in Megatron's checkpoint_version order."""
    npr = N // T
    xs = [p.reshape(N, H, *p.shape[1:])[r * npr:(r + 1) * npr] for p in parts]   # [npr, H, ...]
    if len(parts) == 1 or version == 0:
        a = torch.stack(xs, 0)                                                    # (parts, npr, H)
    elif version == 1.0:
        a = torch.stack(xs, 2)                                                    # (npr, H, parts)
    else:
        a = torch.stack(xs, 1)                                                    # (npr, parts, H)
    return a.reshape(-1, *parts[0].shape[1:]).float().clone()


def write_megatron_t5(root, w, version=3.0, layer_prefix="self_attention"):
    def col(t, r):  # column-parallel (rows) split
        return t.chunk(T, 0)[r].float().clone()

    def row(t, r):  # row-parallel (input columns) split
        return t.chunk(T, 1)[r].float().clone()

    for r in range(T):
        stacks = {}
        for side in ("encoder", "decoder"):
            sd = {}
            for i, lw in enumerate(w[side]):
                p = f"layers.{i}."
                sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = (
                    lw["ln1"]["weight"].float(), lw["ln1"]["bias"].float())
                a = lw["att"]
                sd[p + f"{layer_prefix}.query_key_value.weight"] = _fuse([a["q"], a["k"], a["v"]], r, version)
                sd[p + f"{layer_prefix}.query_key_value.bias"] = _fuse([a["qb"], a["kb"], a["vb"]], r, version)
                sd[p + f"{layer_prefix}.dense.weight"] = row(a["o"], r)
                sd[p + f"{layer_prefix}.dense.bias"] = a["ob"].float()
                sd[p + "post_attention_layernorm.weight"] = lw["ln2"]["weight"].float()
                sd[p + "post_attention_layernorm.bias"] = lw["ln2"]["bias"].float()
                if side == "decoder":
                    c = lw["cross"]
                    sd[p + "inter_attention.query.weight"] = _fuse([c["q"]], r, version)
                    sd[p + "inter_attention.query.bias"] = _fuse([c["qb"]], r, version)
                    sd[p + "inter_attention.key_value.weight"] = _fuse([c["k"], c["v"]], r, version)
                    sd[p + "inter_attention.key_value.bias"] = _fuse([c["kb"], c["vb"]], r, version)
                    sd[p + "inter_attention.dense.weight"] = row(c["o"], r)
                    sd[p + "inter_attention.dense.bias"] = c["ob"].float()
                    sd[p + "post_inter_attention_layernorm.weight"] = lw["ln3"]["weight"].float()
                    sd[p + "post_inter_attention_layernorm.bias"] = lw["ln3"]["bias"].float()
                m = lw["mlp"]
                sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = col(m["wi"], r), col(m["wib"], r)
                sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = row(m["wo"], r), m["wob"].float()
            fin = w["enc_final" if side == "encoder" else "dec_final"]
            sd["final_layernorm.weight"], sd["final_layernorm.bias"] = fin["weight"].float(), fin["bias"].float()
            stacks[side] = sd
        ckpt = {"args": argparse.Namespace(num_layers=LE, decoder_num_layers=LD, hidden_size=D, num_attention_heads=N,
                                           kv_channels=H, ffn_hidden_size=F, padded_vocab_size=V,
                                           max_position_embeddings=P, tensor_model_parallel_size=T,
                                           pipeline_model_parallel_size=1, layernorm_epsilon=EPS,
                                           bias_gelu_fusion=True, openai_gelu=False,
                                           apply_query_key_layer_scaling=True, tokenizer_type="BertWordPieceLowerCase"),
                "checkpoint_version": version, "iteration": 0,
                "model": {"language_model": {
                    "embedding": {"word_embeddings": {"weight": col(w["wte"], r)},
                                  "position_embeddings": {"weight": w["wpe"].float()}},
                    "encoder": stacks["encoder"], "decoder": stacks["decoder"]},
                    "lm_head": {"bias": col(w["lm_bias"], r)}}}
        os.makedirs(os.path.join(root, "release", f"mp_rank_{r:02d}"), exist_ok=True)
        torch.save(ckpt, os.path.join(root, "release", f"mp_rank_{r:02d}", "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    return root


# ------------------------------------------------------------------ independent reference (float64 torch)
def _ln(x, p):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * p["weight"] + p["bias"]


def _attn(xq, xkv, a, causal):
    t, s = xq.shape[0], xkv.shape[0]
    q = (xq @ a["q"].T + a["qb"]).reshape(t, N, H).transpose(0, 1)
    k = (xkv @ a["k"].T + a["kb"]).reshape(s, N, H).transpose(0, 1)
    v = (xkv @ a["v"].T + a["vb"]).reshape(s, N, H).transpose(0, 1)
    sc = q @ k.transpose(1, 2) / math.sqrt(H)
    if causal:
        sc = sc.masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(sc, -1) @ v).transpose(0, 1).reshape(t, N * H)
    return o @ a["o"].T + a["ob"]


def _mlp(x, m):  # Megatron's fused bias-GELU (tanh form)
    y = x @ m["wi"].T + m["wib"]
    y = y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1 + 0.044715 * y * y)))
    return y @ m["wo"].T + m["wob"]


def reference_logits(w, enc, dec):
    x = w["wte"][torch.tensor(enc)] + w["wpe"][: len(enc)]
    for lw in w["encoder"]:
        x = x + _attn(_ln(x, lw["ln1"]), _ln(x, lw["ln1"]), lw["att"], False)
        x = x + _mlp(_ln(x, lw["ln2"]), lw["mlp"])
    e = _ln(x, w["enc_final"])
    y = w["wte"][torch.tensor(dec)] + w["wpe"][: len(dec)]
    for lw in w["decoder"]:
        h = _ln(y, lw["ln1"])
        y = y + _attn(h, h, lw["att"], True)
        y = y + _attn(_ln(y, lw["ln2"]), e, lw["cross"], False)
        y = y + _mlp(_ln(y, lw["ln3"]), lw["mlp"])
    y = _ln(y, w["dec_final"])
    return (y @ w["wte"].T + w["lm_bias"]).numpy()


def _ids(seed=0):
    rng = np.random.RandomState(seed)
    enc = [rng.randint(2, V, size=n).tolist() for n in (9, 4, 12)]
    dec = [[0] + rng.randint(2, V, size=n).tolist() for n in (5, 2, 6)]
    return enc, dec


def _load(path):
    return ftjax.load(path, dtype="float32", attention="xla", max_seq_len=32)


@pytest.fixture(scope="module")
def weights():
    return _weights(0)


@pytest.fixture(scope="module")
def ckpt(weights, tmp_path_factory):
    return write_megatron_t5(str(tmp_path_factory.mktemp("megatron_t5")), weights)


@pytest.mark.parametrize("version,prefix", [(3.0, "self_attention"), (1.0, "attention"), (0, "attention")])
def test_logits_match_reference(weights, ckpt, tmp_path, version, prefix):
    path = ckpt if version == 3.0 else write_megatron_t5(str(tmp_path), weights, version, prefix)
    assert detect_format(path) == "megatron"
    cfg, _ = load_checkpoint(path)
    assert (cfg.norm, cfg.linear_bias, cfg.position, cfg.lm_head_bias) == ("layernorm", True, "learned", True)
    assert (cfg.max_positions, cfg.vocab_size, cfg.num_encoder_layers, cfg.num_decoder_layers) == (P, V, LE, LD)
    enc, dec = _ids()
    ours = _load(path).logits(enc, dec)
    for i in range(len(enc)):
        ref = reference_logits(weights, enc[i], dec[i])
        err = np.abs(ours[i, : len(dec[i])] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (version, i, err)


def test_greedy_matches_reference(weights, ckpt):
    llm = _load(ckpt)
    enc, _ = _ids(2)
    res = llm.generate(enc, max_new_tokens=8, start_id=0)  # eos_id None: no early stop
    for i, p in enumerate(enc):
        dec, logits = [0], []
        for _ in range(8):
            lg = reference_logits(weights, p, dec)[-1]
            logits.append(lg)
            dec.append(int(np.argmax(lg)))
        assert_greedy_match(list(res.tokens[i]), dec[1:], np.stack(logits))


def test_convert_round_trip(ckpt, tmp_path):
    dst = str(tmp_path / "ftjax")
    r = subprocess.run([sys.executable, "-m", "ftjax.convert", ckpt, dst], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert detect_format(dst) == "ftjax"
    ref_cfg, ref = load_checkpoint(ckpt)
    cfg, params = load_checkpoint(dst)
    assert cfg == ref_cfg
    np.testing.assert_array_equal(np.asarray(params["embed"]["positions"]), ref["embed"]["positions"])
    np.testing.assert_array_equal(np.asarray(params["lm_head_bias"]), ref["lm_head_bias"])
    enc, dec = _ids(1)
    np.testing.assert_allclose(_load(dst).logits(enc, dec), _load(ckpt).logits(enc, dec), atol=1e-6)


def test_bad_shape_names_the_key(weights, tmp_path):
    path = write_megatron_t5(str(tmp_path), weights)
    f = os.path.join(path, "release", "mp_rank_01", "model_optim_rng.pt")
    sd = torch.load(f, weights_only=False)
    key = "layers.1.inter_attention.key_value.weight"
    sd["model"]["language_model"]["decoder"][key] = torch.zeros(5, D)
    torch.save(sd, f)
    with pytest.raises(ValueError, match=r"mp_rank_01.*decoder\.layers\.1\.inter_attention\.key_value\.weight"):
        load_checkpoint(path)


def test_tensor_parallel_and_pipeline_refusal(weights, ckpt):
    """Megatron-LM T5 under tensor_parallel=2 equals one device; pipeline stages are refused by name."""
    enc, dec = _ids(3)
    ref = _load(ckpt)
    one = ref.logits(enc, dec)
    tp = ftjax.load(ckpt, dtype="float32", attention="xla", max_seq_len=32, tensor_parallel=2)
    two = tp.logits(enc, dec)
    assert np.abs(two - one).max() / max(1.0, np.abs(one).max()) < 1e-5
    assert tp.generate(enc, max_new_tokens=5, start_id=0).tokens == \
        ref.generate(enc, max_new_tokens=5, start_id=0).tokens
    from ftjax.config import T5Config
    from ftjax.models import t5
    from ftjax.sharding.mesh import make_mesh

    cfg = T5Config(vocab_size=V, hidden=16, head_dim=4, ffn_dim=32, num_heads=4, num_encoder_layers=2,
                   num_decoder_layers=2, norm="layernorm", linear_bias=True, position="learned",
                   lm_head_bias=True, tie_embeddings=True, scale_logits=False, max_positions=32)
    with pytest.raises(ValueError, match="pipeline_parallel=2.*norm='layernorm'.*position='learned'"):
        ftjax.LLM(cfg, t5.init_params(cfg), dtype="float32", attention="xla", max_seq_len=32,
                  mesh=make_mesh(1, 2))
