"""Checkpoint formats against HF transformers (float32 logits within 1e-4 relative).

Every foreign format is written here, from a tiny random HF GPT2LMHeadModel, with that format's own
key names, orderings and file layout (independently of ftjax's readers):
  * Megatron-LM `model_optim_rng.pt`, tensor parallel 2 (`mp_rank_00/01`), checkpoint_version 0, 1.0, 3.0;
  * FasterTransformer converted folders (`config.ini` + raw `model.*.bin`), tensor_para_size 2, fp32/fp16;
  * HF -> `python -m ftjax.convert` -> ftjax (orbax) -> load.
"""
import argparse
import collections
import configparser
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint import detect_format, load_checkpoint
from ftjax.models import gpt

V, D, L, N, F, P = 96, 32, 2, 4, 64, 32
H = D // N


def _hf_model(path, *, seed=0, activation="gelu_new", tie=True, eos=V - 1, vocab=V):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=P, n_embd=D, n_layer=L, n_head=N, n_inner=F,
                                  activation_function=activation, tie_word_embeddings=tie,
                                  bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger-than-default init: non-degenerate logits in a tiny model
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def _sd(model):
    """HF state dict as float32 numpy, without the `transformer.` prefix."""
    return {k.removeprefix("transformer."): v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


IDS = np.random.RandomState(5).randint(0, V, size=(2, 11)).astype(np.int32)
LENGTHS = np.array([11, 7], np.int32)


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


def _check_logits(cfg, params, ref):
    logits = np.asarray(gpt.build(cfg).apply({"params": params}, IDS, LENGTHS, True,
                                             method=gpt.GPT.prefill)[0])
    logits = logits[..., :ref.shape[-1]]
    for b, n in enumerate(LENGTHS):  # right-padded rows: positions < length only (causal attention)
        rel = np.abs(logits[b, :n] - ref[b, :n]).max() / np.abs(ref[b, :n]).max()
        assert rel < 1e-4, (b, rel)


@pytest.fixture(scope="module")
def exact_gelu(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_exact"))
    return path, _hf_model(path, activation="gelu")


@pytest.fixture(scope="module")
def tanh_gelu(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tanh"))
    return path, _hf_model(path, seed=1)


# ------------------------------------------------------------------------------------------------
# Megatron-LM writer (model_optim_rng.pt per tensor-parallel rank)

def write_megatron(root, model, *, version, T=2, layout="release", drop=None, args_overrides=None, pad_to=None):
    sd = _sd(model)
    vocab = sd["wte.weight"].shape[0]
    if pad_to:  # Megatron pads the embedding to a multiple of 128 * T rows (padded_vocab_size)
        pad = np.random.RandomState(9).normal(0, 0.2, (pad_to - vocab, D)).astype(np.float32)
        sd["wte.weight"] = np.concatenate([sd["wte.weight"], pad])
        if "lm_head.weight" in sd:
            sd["lm_head.weight"] = np.concatenate([sd["lm_head.weight"], pad])
    npr = N // T
    os.makedirs(root, exist_ok=True)
    if layout == "release":
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("release")
        base = os.path.join(root, "release")
    elif layout == "iter":
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("100")
        base = os.path.join(root, "iter_0000100")
    else:
        base = root
    args = argparse.Namespace(num_layers=L, hidden_size=D, num_attention_heads=N, ffn_hidden_size=F,
                              max_position_embeddings=P, tensor_model_parallel_size=T,
                              pipeline_model_parallel_size=1, padded_vocab_size=pad_to or vocab,
                              tokenizer_type="GPT2BPETokenizer", layernorm_epsilon=1e-5, openai_gelu=False,
                              bias_gelu_fusion=False, apply_residual_connection_post_layernorm=False,
                              fp16=False, bf16=False)
    for k, v in (args_overrides or {}).items():
        setattr(args, k, v)
    body_key = "encoder" if version >= 3 else "transformer"
    attn = "self_attention" if version >= 3 else "attention"
    t = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    for r in range(T):
        heads = slice(r * npr, (r + 1) * npr)
        body = collections.OrderedDict()
        for i in range(L):
            p = f"h.{i}."
            body[f"layers.{i}.input_layernorm.weight"] = t(sd[p + "ln_1.weight"])
            body[f"layers.{i}.input_layernorm.bias"] = t(sd[p + "ln_1.bias"])
            w = sd[p + "attn.c_attn.weight"].T.reshape(3, N, H, D)[:, heads]  # torch Linear [out, in]
            b = sd[p + "attn.c_attn.bias"].reshape(3, N, H)[:, heads]
            if version == 1.0:  # rows (np, hn, 3)
                w, b = w.transpose(1, 2, 0, 3), b.transpose(1, 2, 0)
            elif version >= 2:    # rows (np, 3, hn); version 0 keeps (3, np, hn)
                w, b = w.transpose(1, 0, 2, 3), b.transpose(1, 0, 2)
            body[f"layers.{i}.{attn}.query_key_value.weight"] = t(w.reshape(3 * npr * H, D))
            body[f"layers.{i}.{attn}.query_key_value.bias"] = t(b.reshape(3 * npr * H))
            dense = sd[p + "attn.c_proj.weight"].T  # [out d, in d]; row-parallel: split the input columns
            body[f"layers.{i}.{attn}.dense.weight"] = t(np.split(dense, T, axis=1)[r])
            body[f"layers.{i}.{attn}.dense.bias"] = t(sd[p + "attn.c_proj.bias"])
            body[f"layers.{i}.post_attention_layernorm.weight"] = t(sd[p + "ln_2.weight"])
            body[f"layers.{i}.post_attention_layernorm.bias"] = t(sd[p + "ln_2.bias"])
            body[f"layers.{i}.mlp.dense_h_to_4h.weight"] = t(np.split(sd[p + "mlp.c_fc.weight"].T, T, axis=0)[r])
            body[f"layers.{i}.mlp.dense_h_to_4h.bias"] = t(np.split(sd[p + "mlp.c_fc.bias"], T)[r])
            body[f"layers.{i}.mlp.dense_4h_to_h.weight"] = t(np.split(sd[p + "mlp.c_proj.weight"].T, T, axis=1)[r])
            body[f"layers.{i}.mlp.dense_4h_to_h.bias"] = t(sd[p + "mlp.c_proj.bias"])
        body["final_layernorm.weight"] = t(sd["ln_f.weight"])
        body["final_layernorm.bias"] = t(sd["ln_f.bias"])
        if drop:
            del body[drop]
        lm = {"embedding": {"word_embeddings": {"weight": t(np.split(sd["wte.weight"], T)[r])},
                            "position_embeddings": {"weight": t(sd["wpe.weight"])}},
              body_key: body}
        if not model.config.tie_word_embeddings:  # untie_embeddings_and_output_weights: column parallel
            lm["output_layer"] = {"weight": t(np.split(sd["lm_head.weight"], T)[r])}
        ckpt = {"iteration": 0, "checkpoint_version": version, "args": args, "model": {"language_model": lm}}
        os.makedirs(os.path.join(base, f"mp_rank_{r:02d}"))
        torch.save(ckpt, os.path.join(base, f"mp_rank_{r:02d}", "model_optim_rng.pt"))
    return root


@pytest.mark.parametrize("version,layout", [(0, "release"), (1.0, "iter"), (3.0, "ranks")])
def test_megatron_tp2_matches_hf(tmp_path, exact_gelu, version, layout):
    _, model = exact_gelu
    root = write_megatron(str(tmp_path / "meg"), model, version=version, layout=layout)
    assert detect_format(root) == "megatron"
    cfg, params = load_checkpoint(root)
    assert cfg.activation == "gelu" and cfg.tie_embeddings and cfg.num_heads == N
    assert cfg.eos_id is None and cfg.vocab == V  # GPT2BPETokenizer but fewer than 50257 rows
    _check_logits(cfg, params, _hf_logits(model))


def test_megatron_gpt2_padded_vocab_untied(tmp_path):
    """GPT2BPETokenizer with padded_vocab_size 50304 > 50257 rows: padding rows are never produced,
    eos = 50256; an untied `output_layer` is merged over the ranks."""
    model = _hf_model(str(tmp_path / "hf"), seed=3, activation="gelu", tie=False, vocab=50257, eos=50256)
    root = write_megatron(str(tmp_path / "meg"), model, version=3.0, pad_to=50304)
    cfg, params = load_checkpoint(root)
    assert (cfg.vocab_size, cfg.vocab, cfg.eos_id, cfg.bos_id) == (50304, 50257, 50256, 50256)
    assert not cfg.tie_embeddings
    ref = _hf_logits(model)
    _check_logits(cfg, params, ref)
    full = np.asarray(gpt.build(cfg).apply({"params": params}, IDS, LENGTHS, method=gpt.GPT.prefill)[0])
    assert full.shape == (2, 50304) and full[:, 50257:].max() < -1e29
    # llm.logits gives the real vocabulary's columns only (the HF model's), not the padding rows
    ours = ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=1, max_seq_len=32).logits(
        [IDS[0, : LENGTHS[0]].tolist()])
    assert ours.shape == (1, LENGTHS[0], 50257)
    np.testing.assert_allclose(ours[0], ref[0, : LENGTHS[0]], rtol=2e-3, atol=2e-3)


def test_megatron_fused_bias_gelu_is_tanh(tmp_path, tanh_gelu):
    """Megatron's default bias_gelu_fusion computes the tanh GELU: such a checkpoint matches HF gelu_new."""
    _, model = tanh_gelu
    root = write_megatron(str(tmp_path / "meg"), model, version=3, T=2, layout="mp",
                          args_overrides={"bias_gelu_fusion": True})
    cfg, params = load_checkpoint(root)
    assert cfg.activation == "gelu_tanh"
    _check_logits(cfg, params, _hf_logits(model))


def test_megatron_refuses_post_layernorm_and_missing_key(tmp_path, exact_gelu):
    _, model = exact_gelu
    root = write_megatron(str(tmp_path / "post"), model, version=3.0,
                          args_overrides={"apply_residual_connection_post_layernorm": True})
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        load_checkpoint(root)
    root = write_megatron(str(tmp_path / "miss"), model, version=0, drop="layers.1.mlp.dense_4h_to_h.bias")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.dense_4h_to_h\.bias"):
        load_checkpoint(root)


# ------------------------------------------------------------------------------------------------
# FasterTransformer converted folder writer (huggingface_gpt_convert.py's layout)

def write_ft(out, model, *, T=2, weight_data_type="fp32", eps=1e-5):
    sd = _sd(model)
    import ml_dtypes

    npd = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}[weight_data_type]
    d = os.path.join(out, f"{T}-gpu")
    os.makedirs(d)
    cp = configparser.ConfigParser()
    cp["gpt"] = {"model_name": "gpt", "head_num": str(N), "size_per_head": str(H), "inter_size": str(F),
                 "max_pos_seq_len": str(P), "num_layer": str(L), "vocab_size": str(V),
                 "start_id": str(model.config.bos_token_id), "end_id": str(model.config.eos_token_id),
                 "weight_data_type": weight_data_type, "tensor_para_size": str(T)}
    if eps is not None:  # huggingface_gpt_convert.py omits it (FT then uses 1e-6); megatron's writes it
        cp["gpt"]["layernorm_eps"] = str(eps)
    with open(os.path.join(d, "config.ini"), "w") as f:
        cp.write(f)

    def save(name, a):
        np.ascontiguousarray(a).astype(npd).tofile(os.path.join(d, name))

    save("model.wte.bin", sd["wte.weight"])
    save("model.wpe.bin", sd["wpe.weight"])
    save("model.final_layernorm.weight.bin", sd["ln_f.weight"])
    save("model.final_layernorm.bias.bin", sd["ln_f.bias"])
    if not model.config.tie_word_embeddings:
        save("model.lm_head.weight.bin", sd["lm_head.weight"])
    for i in range(L):
        p, o = f"h.{i}.", f"model.layers.{i}."
        save(o + "input_layernorm.weight.bin", sd[p + "ln_1.weight"])
        save(o + "input_layernorm.bias.bin", sd[p + "ln_1.bias"])
        for r, w in enumerate(np.split(sd[p + "attn.c_attn.weight"].reshape(D, 3, D), T, axis=-1)):
            save(o + f"attention.query_key_value.weight.{r}.bin", w)
        for r, b in enumerate(np.split(sd[p + "attn.c_attn.bias"].reshape(3, D), T, axis=-1)):
            save(o + f"attention.query_key_value.bias.{r}.bin", b)
        for r, w in enumerate(np.split(sd[p + "attn.c_proj.weight"], T, axis=0)):
            save(o + f"attention.dense.weight.{r}.bin", w)
        save(o + "attention.dense.bias.bin", sd[p + "attn.c_proj.bias"])
        save(o + "post_attention_layernorm.weight.bin", sd[p + "ln_2.weight"])
        save(o + "post_attention_layernorm.bias.bin", sd[p + "ln_2.bias"])
        for r, w in enumerate(np.split(sd[p + "mlp.c_fc.weight"], T, axis=-1)):
            save(o + f"mlp.dense_h_to_4h.weight.{r}.bin", w)
        for r, b in enumerate(np.split(sd[p + "mlp.c_fc.bias"], T, axis=-1)):
            save(o + f"mlp.dense_h_to_4h.bias.{r}.bin", b)
        for r, w in enumerate(np.split(sd[p + "mlp.c_proj.weight"], T, axis=0)):
            save(o + f"mlp.dense_4h_to_h.weight.{r}.bin", w)
        save(o + "mlp.dense_4h_to_h.bias.bin", sd[p + "mlp.c_proj.bias"])
    return d


def test_ft_fp32_tp2_matches_hf(tmp_path, tanh_gelu):
    _, model = tanh_gelu
    d = write_ft(str(tmp_path / "ft"), model)
    for path in (d, str(tmp_path / "ft")):  # the N-gpu folder itself or the folder one level up
        assert detect_format(path) == "ft"
        cfg, params = load_checkpoint(path)
        assert cfg.tie_embeddings and cfg.eos_id == V - 1 and cfg.activation == "gelu_tanh"
        _check_logits(cfg, params, _hf_logits(model))


@pytest.mark.parametrize("wdt", ["fp16", "bf16"])
def test_ft_half_untied_tp2_matches_hf(tmp_path, wdt):
    model = _hf_model(str(tmp_path / "hf"), seed=2, tie=False)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[wdt]
    with torch.no_grad():  # the reference sees the same rounded weights the files hold
        for p in model.parameters():
            p.copy_(p.to(half).float())
    d = write_ft(str(tmp_path / "ft"), model, weight_data_type=wdt)
    cfg, params = load_checkpoint(d)
    assert not cfg.tie_embeddings
    _check_logits(cfg, params, _hf_logits(model))


def test_ft_defaults_and_bad_files(tmp_path, tanh_gelu):
    _, model = tanh_gelu
    d = write_ft(str(tmp_path / "ft"), model, eps=None)
    cfg, _ = load_checkpoint(d)
    assert cfg.norm_eps == 1e-6  # FT's own default when config.ini has no layernorm_eps
    name = "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    fn = os.path.join(d, name)
    full = os.path.getsize(fn)
    with open(fn, "r+b") as f:
        f.truncate(full - 4)
    with pytest.raises(ValueError, match=rf"{name}.*{full - 4} bytes.*{full} bytes"):
        load_checkpoint(d)
    os.remove(fn)
    with pytest.raises(ValueError, match=name):
        load_checkpoint(d)
    write_ft(str(tmp_path / "ft"), model, T=1)  # now 1-gpu/ and 2-gpu/ side by side
    with pytest.raises(ValueError, match="1-gpu.*2-gpu"):
        load_checkpoint(str(tmp_path / "ft"))


# ------------------------------------------------------------------------------------------------
# HF -> ftjax (orbax) via the CLI

def test_convert_cli_round_trip(tmp_path, tanh_gelu):
    src, model = tanh_gelu
    dst = str(tmp_path / "ftjax_f32")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ftjax.convert", src, dst], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "layer" in r.stderr or "arrays" in r.stderr
    assert "done:" in r.stderr
    assert detect_format(dst) == "ftjax"
    cfg, params = load_checkpoint(dst)
    assert isinstance(params["embed"]["tokens"], np.ndarray)
    assert params["embed"]["tokens"].dtype == np.float32
    _check_logits(cfg, params, _hf_logits(model))


def test_convert_bfloat16_and_shardings(tmp_path, tanh_gelu):
    import jax

    from ftjax import convert
    from ftjax.checkpoint import orbax_io

    src, _ = tanh_gelu
    dst = str(tmp_path / "ftjax_bf16")
    assert convert.main([src, dst, "--dtype", "bfloat16"]) == 0
    assert json.load(open(os.path.join(dst, "ftjax_config.json")))["dtype"] == "bfloat16"
    cfg, params = load_checkpoint(dst)
    assert str(params["layers_0"]["attn"]["q"]["kernel"].dtype) == "bfloat16"
    ref_cfg, ref = load_checkpoint(src)
    assert cfg == ref_cfg
    np.testing.assert_allclose(params["layers_1"]["mlp"]["wi"]["kernel"].astype(np.float32),
                               ref["layers_1"]["mlp"]["wi"]["kernel"], rtol=1e-2, atol=1e-2)
    # Restore onto explicit shardings (what the sharding issue passes), casting to float32 on the way.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, params)
    _, on_dev = orbax_io.load(dst, dtype="float32", shardings=shardings)
    leaf = on_dev["embed"]["tokens"]
    assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32 and leaf.sharding == dev
    # Not over an existing checkpoint.
    assert convert.main([src, dst]) == 2


def test_convert_refuses_int8_until_quantize_exists(tmp_path, tanh_gelu, capsys):
    import importlib.util

    from ftjax import convert

    if importlib.util.find_spec("ftjax.quantize") is not None:
        pytest.skip("ftjax.quantize exists")
    assert convert.main([tanh_gelu[0], str(tmp_path / "q"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "not available yet" in err


# ------------------------------------------------------------------------------------------------
# Broken inputs

def test_bad_checkpoints(tmp_path, tanh_gelu):
    from safetensors.numpy import load_file, save_file

    src, _ = tanh_gelu
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Looked for.*config.json.*config.ini.*model_optim_rng.pt"):
        load_checkpoint(str(empty))
    # Unknown architecture.
    bad = tmp_path / "bert"
    bad.mkdir()
    for f in os.listdir(src):
        os.link(os.path.join(src, f), bad / f)
    hf = json.load(open(bad / "config.json"))
    hf["model_type"], hf["architectures"] = "bert", ["BertForMaskedLM"]
    os.remove(bad / "config.json")
    json.dump(hf, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_checkpoint(str(bad))
    # Missing key and wrong shape in an HF safetensors file.
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for what, edit, pat in (("missing", lambda t: t.pop("transformer.h.1.ln_2.bias"), r"h\.1\.ln_2\.bias"),
                            ("shape", lambda t: t.__setitem__("transformer.wpe.weight", np.zeros((P + 1, D), np.float32)),
                             r"embed/positions.*\(33, 32\)")):
        d = tmp_path / what
        d.mkdir()
        os.link(os.path.join(src, "config.json"), d / "config.json")
        t = dict(tensors)
        edit(t)
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(ValueError, match=pat):
            load_checkpoint(str(d))


def test_megatron_without_args_and_foreign_classes(tmp_path, tanh_gelu):
    """The 345M release layout: TP 1, no pickled args (heads passed in), checkpoint_version 0, plus an
    object of a package not installed here pickled beside the weights (Megatron's optimizer state).
    Trained with Megatron's default fused bias-GELU: the tanh form."""
    _, model = tanh_gelu
    root = write_megatron(str(tmp_path / "meg"), model, version=0, T=1, layout="release")
    f = os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt")
    ckpt = torch.load(f, weights_only=False)
    del ckpt["args"], ckpt["checkpoint_version"]
    import types
    fake = types.ModuleType("megatron_not_installed")
    fake.OptimizerState = type("OptimizerState", (), {"__module__": "megatron_not_installed"})
    sys.modules["megatron_not_installed"] = fake
    try:
        ckpt["optimizer"] = {"state": fake.OptimizerState()}
        torch.save(ckpt, f)
    finally:
        del sys.modules["megatron_not_installed"]
    raw = open(f, "rb").read()
    assert b"argparse" not in raw
    with pytest.raises(ValueError, match="num_heads"):
        load_checkpoint(root)
    cfg, params = load_checkpoint(root, num_heads=N)
    assert cfg.activation == "gelu_tanh" and cfg.eos_id is None
    _check_logits(cfg, params, _hf_logits(model))


def test_ftjax_load_reads_converted_formats(tmp_path, tanh_gelu):
    import ftjax

    _, model = tanh_gelu
    d = write_ft(str(tmp_path / "ft"), model)
    llm = ftjax.load(str(tmp_path / "ft"), dtype="float32", max_batch_size=2, max_seq_len=P, attention="xla")
    ours = llm.logits([IDS[0].tolist()])
    ref = _hf_logits(model)[:1]
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert d
