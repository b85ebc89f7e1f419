"""T5 checkpoints in FasterTransformer's converted layout, NeMo Megatron layout (.nemo / unpacked, TP ranks),
and Megatron-LM's (detected here; loading is tested in test_t5_megatron.py), each written here from a random tiny HF T5ForConditionalGeneration with that
format's own names, orderings and files (not through ftjax), loaded and compared with HF's logits."""
import argparse
import configparser
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint import detect_format, load_checkpoint
from tests.test_t5 import V, make_hf_t5

D, N, H = 32, 4, 8


@pytest.fixture(scope="module")
def v10(tmp_path_factory):
    """HF T5 v1.0: ReLU, tied head with d_model**-0.5 output scaling."""
    return make_hf_t5(str(tmp_path_factory.mktemp("hf_v10")), seed=3)


@pytest.fixture(scope="module")
def v11(tmp_path_factory):
    """HF T5 v1.1 shape: gated GELU, untied lm_head (installed by hand: transformers 5 always ties), no scaling;
    decoder deeper than the encoder."""
    model = make_hf_t5(str(tmp_path_factory.mktemp("hf_v11")), proj="gated-gelu", scale=False, enc_layers=2,
                       dec_layers=3, seed=4)
    torch.manual_seed(5)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5)
    model.lm_head = head
    return model


def _ids(seed=0):
    rng = np.random.RandomState(seed)
    enc = [rng.randint(2, V, size=n).tolist() for n in (9, 4, 12)]
    dec = [[0] + rng.randint(2, V, size=n).tolist() for n in (5, 2, 6)]
    return enc, dec


def _check(llm, model):
    enc, dec = _ids()
    ours = llm.logits(enc, dec)
    for i in range(len(enc)):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([enc[i]]), decoder_input_ids=torch.tensor([dec[i]])).logits.numpy()[0]
        err = np.abs(ours[i, : len(dec[i]), :V] - ref).max() / np.abs(ref).max()  # past V: Megatron's padding
        assert err < 1e-4, (i, err)


def _load(path):
    return ftjax.load(path, dtype="float32", attention="xla", max_seq_len=32)


def _round(model, dtype):
    with torch.no_grad():  # the reference sees the rounded weights the files hold
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


# ---------------------------------------------------------------- FT: huggingface_t5_ckpt_convert.py's layout
def write_ft_t5(out, model, T=1, wdt="fp32", legacy_config=False):
    """What FT's huggingface_t5_ckpt_convert.py writes into {out}/{T}-gpu (weights from state_dict, 2-D ones
    transposed, split over T ranks; decoder self-attention q/k/v fused)."""
    d = os.path.join(out, f"{T}-gpu")
    os.makedirs(d, exist_ok=True)
    npd = {"fp32": np.float32, "fp16": np.float16}[wdt]
    cp = configparser.ConfigParser()
    for sec, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        cp[sec] = {k: f"{v}" for k, v in stack.config.to_dict().items()}
        cp[sec]["weight_data_type"] = wdt
        cp[sec]["relative_attention_num_buckets_or_max_pos_seq_len"] = cp[sec].pop("relative_attention_num_buckets")
        if legacy_config:  # a transformers-4 era config: untied v1.1 says so, and there is no scale flag
            cp[sec]["tie_word_embeddings"] = "False"
            cp[sec].pop("scale_decoder_outputs", None)
    gated = "gated" in model.config.feed_forward_proj
    cp["structure"] = {"t5_with_bias": "false", "use_gated_activation": "1" if gated else "false",
                       "position_embedding_type": "relative"}
    with open(os.path.join(d, "config.ini"), "w") as f:
        cp.write(f)

    def save(name, a):
        a.astype(npd).tofile(os.path.join(d, name))

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for key, val in sd.items():
        if val.ndim == 2:
            val = val.transpose(1, 0)
        if "shared.weight" in key:
            save(f"{key}.bin", val)
            save(f"{key}_T.bin", val.T)
        elif "lm_head.weight" in key:
            save(f"{key}.bin", val.transpose(1, 0))
        elif "layer_norm.weight" in key:
            save(f"{key}.bin", val)
        elif any(s in key for s in ("SelfAttention.o.weight", "EncDecAttention.o.weight", "DenseReluDense.wo.weight")):
            for j, part in enumerate(np.split(val, T, axis=0)):
                save(f"{key}.{j}.bin", part)
        elif ("DenseReluDense.wi.weight" in key or ("encoder" in key and any(
                f"SelfAttention.{x}.weight" in key for x in "qkv")) or any(f"EncDecAttention.{x}.weight" in key for x in "qkv")):
            for j, part in enumerate(np.split(val, T, axis=-1)):
                save(f"{key}.{j}.bin", part)
        elif "DenseReluDense.wi_0.weight" in key or "DenseReluDense.wi_1.weight" in key:
            k2 = key.replace("wi_0", "wi") if "wi_0" in key else key.replace("wi_1", "wi2")
            for j, part in enumerate(np.split(val, T, axis=-1)):
                save(f"{k2}.{j}.bin", part)
        elif "relative_attention_bias" in key:
            for j, part in enumerate(np.split(val, T, axis=0)):
                save(f"{key}.{j}.bin", part)
    for i in range(model.decoder.config.num_layers):  # fuse_decoder_qkv
        p = f"decoder.block.{i}.layer.0.SelfAttention."
        qkv = np.concatenate([sd[p + f"{x}.weight"].T for x in "qkv"], axis=-1)
        qkv = qkv.reshape(qkv.shape[0], 3, -1)
        for j, part in enumerate(np.split(qkv, T, axis=-1)):
            save(p + f"qkv.weight.{j}.bin", part)
    return d


def test_ft_t5_v10_tp2_matches_hf(tmp_path, v10):
    d = write_ft_t5(str(tmp_path / "ft"), v10, T=2)
    for path in (d, str(tmp_path / "ft")):  # the N-gpu folder or its parent
        assert detect_format(path) == "ft"
    cfg, _ = load_checkpoint(str(tmp_path / "ft"))
    assert cfg.arch == "t5" and cfg.tie_embeddings and cfg.scale_logits and cfg.activation == "relu"
    _check(_load(str(tmp_path / "ft")), v10)


def test_ft_t5_v11_fp16_untied_matches_hf(tmp_path, v11):
    _round(v11, torch.float16)
    d = write_ft_t5(str(tmp_path / "ft"), v11, T=1, wdt="fp16", legacy_config=True)
    cfg, _ = load_checkpoint(d)
    assert not cfg.tie_embeddings and not cfg.scale_logits and cfg.gated_ffn
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 3)
    _check(_load(d), v11)


def test_ft_t5_broken(tmp_path, v10):
    d = write_ft_t5(str(tmp_path / "ft"), v10, T=2)
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight.1.bin"
    fn = os.path.join(d, name)
    data = open(fn, "rb").read()
    with open(fn, "wb") as f:
        f.write(data[:-4])
    with pytest.raises(ValueError, match=rf"{name}: {len(data) - 4} bytes.*needs {len(data)} bytes"):
        load_checkpoint(d)
    os.remove(fn)
    with pytest.raises(ValueError, match=f"missing weight file {name}"):
        load_checkpoint(d)
    cp = configparser.ConfigParser()
    cp.read(os.path.join(d, "config.ini"))
    cp["structure"]["t5_with_bias"] = "true"
    with open(os.path.join(d, "config.ini"), "w") as f:
        cp.write(f)
    with pytest.raises(ValueError, match="t5_with_bias.*LayerNorm with bias"):
        load_checkpoint(d)


# ---------------------------------------------------------------- NeMo Megatron T5
def nemo_state_dict(model, T, *, legacy=False, scale_scores=True, untied=False, o2=False):
    """Per-rank NeMo MegatronT5Model state dicts (names, [out, in] torch layout, fused QKV rows and TP split
    as Megatron's column/row-parallel layers)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, h = N, H
    npr = n // T
    ranks = [dict() for _ in range(T)]
    pre = "model." if o2 else ""

    def put(name, t, axis=None):
        for r in range(T):
            ranks[r][pre + name] = t.clone() if axis is None else torch.chunk(t, T, dim=axis)[r].clone()

    def fuse(ws):  # [n*h, d] each -> per-rank rows (np, parts, h) or legacy (parts, np, h), concatenated over ranks
        w = torch.stack([x.reshape(n, h, -1) for x in ws], 0)                 # [parts, n, h, d]
        out = []
        for r in range(T):
            wr = w[:, r * npr:(r + 1) * npr]                                  # [parts, np, h, d]
            wr = wr if legacy else wr.permute(1, 0, 2, 3)
            out.append(wr.reshape(-1, w.shape[-1]))
        return torch.cat(out, 0)

    qscale = h ** 0.5 if scale_scores else 1.0  # NeMo divides scores by sqrt(h); HF T5 does not
    E = "enc_dec_model."
    vp = -(-V // (2 * T)) * 2 * T  # Megatron pads the vocabulary to a multiple of the TP size

    def pad(w):
        return torch.cat([w, torch.zeros((vp - V,) + tuple(w.shape[1:]))], 0)

    put(E + "encoder_embedding.word_embeddings.weight", pad(sd["shared.weight"]), 0)
    put(E + "decoder_embedding.word_embeddings.weight", pad(sd["shared.weight"]), 0)
    for side in ("encoder", "decoder"):
        put(E + f"{side}_relative_position_embedding.relative_position_embedding.weight",
            sd[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
        S = f"enc_dec_model.enc_dec_model.{side}.model."
        put(S + "final_layernorm.weight", sd[f"{side}.final_layer_norm.weight"])
        nl = model.config.num_layers if side == "encoder" else model.config.num_decoder_layers
        for i in range(nl):
            b, p = f"{side}.block.{i}.layer.", f"{S}layers.{i}."
            a = b + "0.SelfAttention."
            put(p + "input_layernorm.weight", sd[b + "0.layer_norm.weight"])
            put(p + "self_attention.query_key_value.weight",
                fuse([sd[a + "q.weight"] * qscale, sd[a + "k.weight"], sd[a + "v.weight"]]), 0)
            put(p + "self_attention.dense.weight", sd[a + "o.weight"], 1)
            put(p + "post_attention_layernorm.weight", sd[b + "1.layer_norm.weight"])
            if side == "decoder":
                c = b + "1.EncDecAttention."
                put(p + "inter_attention.query.weight", fuse([sd[c + "q.weight"] * qscale]), 0)
                put(p + "inter_attention.key_value.weight", fuse([sd[c + "k.weight"], sd[c + "v.weight"]]), 0)
                put(p + "inter_attention.dense.weight", sd[c + "o.weight"], 1)
                put(p + "post_inter_attention_layernorm.weight", sd[b + "2.layer_norm.weight"])
            m = b + ("1" if side == "encoder" else "2") + ".DenseReluDense."
            if m + "wi_0.weight" in sd:
                put(p + "mlp.dense_h_to_4h.weight", sd[m + "wi_0.weight"], 0)
                put(p + "mlp.dense_h_to_4h_2.weight", sd[m + "wi_1.weight"], 0)
            else:
                put(p + "mlp.dense_h_to_4h.weight", sd[m + "wi.weight"], 0)
            put(p + "mlp.dense_4h_to_h.weight", sd[m + "wo.weight"], 1)
    if untied:
        put(E + "tokens_head.weight", pad(sd["lm_head.weight"]), 0)
    put(E + "tokens_head.bias", torch.zeros(vp), 0)
    return ranks


def nemo_yaml(model, T, **kw):
    gated = "gated" in model.config.feed_forward_proj
    stack = dict(num_layers=model.config.num_layers, hidden_size=D, ffn_hidden_size=model.config.d_ff,
                 num_attention_heads=N, kv_channels=H, activation="geglu" if gated else "relu", openai_gelu=gated,
                 bias=False, normalization="rmsnorm", position_embedding_type="relative",
                 relative_attention_num_buckets=model.config.relative_attention_num_buckets,
                 relative_attention_max_distance=model.config.relative_attention_max_distance,
                 relative_position_bias_self_attention_only=True, layernorm_epsilon=model.config.layer_norm_epsilon,
                 normalize_attention_scores=kw.pop("scale_scores", True), transformer_block_type="pre_ln",
                 headscale=False, arch="transformer", megatron_legacy=kw.pop("legacy", False))
    dec = dict(stack, num_layers=model.config.num_decoder_layers)
    top = dict(encoder=stack, decoder=dec, tensor_model_parallel_size=T, pipeline_model_parallel_size=1,
               share_token_embeddings=True, share_decoder_tokens_head_embeddings=not kw.pop("untied", False),
               tokens_head_bias=True, max_position_embeddings=512, megatron_amp_O2=False,
               tokenizer=dict(library="sentencepiece", model="nemo:abc_tokenizer.model"), precision=32)
    top.update(kw)
    return top


def _foreign_object():
    """An object of a module that is gone at load time (as NeMo / OmegaConf objects are where NeMo is not
    installed): it must load as a stub."""
    import types

    mod = types.ModuleType("nemo_not_installed_here")
    cls = type("DictConfig", (), {"__module__": mod.__name__})
    mod.DictConfig = cls
    sys.modules[mod.__name__] = mod
    obj = cls()
    obj.content = {"a": 1}
    return obj


def write_nemo(root, model, T, *, archive=False, **kw):
    import yaml

    os.makedirs(root, exist_ok=True)
    opts = {k: kw[k] for k in ("legacy", "scale_scores", "untied") if k in kw}
    ranks = nemo_state_dict(model, T, o2=kw.get("o2", False), **opts)
    with open(os.path.join(root, "model_config.yaml"), "w") as f:
        yaml.safe_dump(nemo_yaml(model, T, **opts), f)
    for r, sd in enumerate(ranks):
        sub = root if T == 1 else os.path.join(root, f"mp_rank_{r:02d}")
        os.makedirs(sub, exist_ok=True)
        torch.save({"state_dict": sd, "hyper_parameters": _foreign_object()} if kw.get("wrapped") else sd,
                   os.path.join(sub, "model_weights.ckpt"))
    sys.modules.pop("nemo_not_installed_here", None)
    if not archive:
        return root
    path = root + ".nemo"
    with tarfile.open(path, "w:") as tar:
        for e in sorted(os.listdir(root)):
            tar.add(os.path.join(root, e), arcname="./" + e)
    return path


def test_nemo_archive_tp2_untied_matches_hf(tmp_path, v11):
    path = write_nemo(str(tmp_path / "t5"), v11, 2, archive=True, untied=True, wrapped=True)
    assert detect_format(path) == "nemo"
    cfg, _ = load_checkpoint(path)
    assert not cfg.tie_embeddings and not cfg.scale_logits and cfg.activation == "gelu_tanh" and cfg.gated_ffn
    _check(_load(path), v11)


def test_nemo_dir_legacy_tied_matches_hf(tmp_path):
    # NeMo's tied head has no d_model**-0.5 scaling: the HF reference is a tied, unscaled T5 (relu)
    model = make_hf_t5(str(tmp_path / "hf"), proj="relu", scale=False, seed=6)
    assert not model.config.scale_decoder_outputs
    d = write_nemo(str(tmp_path / "t5"), model, 1, legacy=True, scale_scores=False, o2=True)
    assert detect_format(d) == "nemo"
    cfg, _ = load_checkpoint(os.path.join(d, "model_weights.ckpt"))  # the .ckpt beside its yaml
    assert cfg.tie_embeddings and not cfg.scale_logits
    _check(_load(d), model)


def test_nemo_broken_and_refused(tmp_path, v11):
    import yaml

    d = write_nemo(str(tmp_path / "t5"), v11, 1)
    fn = os.path.join(d, "model_weights.ckpt")
    sd = torch.load(fn)
    key = "enc_dec_model.enc_dec_model.decoder.model.layers.2.inter_attention.key_value.weight"
    bad = dict(sd)
    bad[key] = bad[key][:-1]
    torch.save(bad, fn)
    with pytest.raises(ValueError, match=rf"{key}.*shape \(63, 32\).*\(64, 32\)"):
        load_checkpoint(d)
    del bad[key]
    torch.save(bad, fn)
    with pytest.raises(ValueError, match=f"missing weight '{key}'"):
        load_checkpoint(d)
    torch.save(sd, fn)
    yml = os.path.join(d, "model_config.yaml")
    base = yaml.safe_load(open(yml))
    for stack_key, val, msg in (("bias", True, "bias.*biased linear"),
                                ("normalization", "layernorm", "normalization.*LayerNorm with bias"),
                                ("position_embedding_type", "learned_absolute", "position_embedding_type")):
        cfg = dict(base, encoder=dict(base["encoder"], **{stack_key: val}))
        yaml.safe_dump(cfg, open(yml, "w"))
        with pytest.raises(ValueError, match=msg):
            load_checkpoint(d)
    yaml.safe_dump(base, open(yml, "w"))
    sd["enc_dec_model.tokens_head.bias"] = torch.ones_like(sd["enc_dec_model.tokens_head.bias"])
    torch.save(sd, fn)
    with pytest.raises(ValueError, match="non-zero LM-head bias"):
        load_checkpoint(d)


# ---------------------------------------------------------------- Megatron-LM T5: recognised (full test: test_t5_megatron.py)
def test_megatron_lm_t5_detected_incomplete_named(tmp_path):
    d, f = 16, 32
    layer = {"input_layernorm.weight": torch.ones(d), "input_layernorm.bias": torch.zeros(d),
             "self_attention.query_key_value.weight": torch.zeros(3 * d, d),
             "self_attention.query_key_value.bias": torch.zeros(3 * d),
             "self_attention.dense.weight": torch.zeros(d, d), "self_attention.dense.bias": torch.zeros(d),
             "mlp.dense_h_to_4h.weight": torch.zeros(f, d), "mlp.dense_4h_to_h.weight": torch.zeros(d, f)}
    ckpt = {"args": argparse.Namespace(num_layers=1, hidden_size=d, num_attention_heads=2, kv_channels=8,
                                       ffn_hidden_size=f, padded_vocab_size=64, max_position_embeddings=32,
                                       tensor_model_parallel_size=1, pipeline_model_parallel_size=1),
            "checkpoint_version": 3.0,
            "model": {"language_model": {
                "embedding": {"word_embeddings": {"weight": torch.zeros(64, d)},
                              "position_embeddings": {"weight": torch.zeros(32, d)}},
                "encoder": {f"layers.0.{k}": v for k, v in layer.items()},
                "decoder": {f"layers.0.{k}": v for k, v in layer.items()}},
                "lm_head": {"bias": torch.zeros(64)}}}
    os.makedirs(tmp_path / "release" / "mp_rank_00")
    torch.save(ckpt, tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert detect_format(str(tmp_path)) == "megatron"
    with pytest.raises(ValueError, match="missing weight 'encoder.final_layernorm.weight'"):
        load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------- python -m ftjax.convert, each format
def test_convert_each_format_round_trip(tmp_path, v10, v11):
    srcs = {"ft": write_ft_t5(str(tmp_path / "ft"), v10, T=2),
            "nemo": write_nemo(str(tmp_path / "nemo"), v11, 2, archive=True, untied=True)}
    enc, dec = _ids(1)
    for fmt, src in srcs.items():
        dst = str(tmp_path / f"{fmt}_ftjax")
        r = subprocess.run([sys.executable, "-m", "ftjax.convert", src, dst], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"format {fmt}" in r.stderr
        assert detect_format(dst) == "ftjax"
        ref_cfg, ref = load_checkpoint(src)
        cfg, params = load_checkpoint(dst)
        assert cfg == ref_cfg
        np.testing.assert_array_equal(np.asarray(params["decoder"]["layers_1"]["self_attn"]["k"]["kernel"]),
                                      ref["decoder"]["layers_1"]["self_attn"]["k"]["kernel"])
        np.testing.assert_allclose(_load(dst).logits(enc, dec), _load(src).logits(enc, dec), atol=1e-6)
    r = subprocess.run([sys.executable, "-m", "ftjax.convert", str(tmp_path / "nothing"), str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr
