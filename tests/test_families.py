"""LLaMA, GPT-J and GPT-NeoX as configurations of the one decoder, against HF transformers (float32).

Tiny random models are built here and saved with save_pretrained:
  * LLaMA: 8 query / 2 kv heads, SwiGLU, RMSNorm, untied head; a LLaMA-3 `rope_scaling` variant (tied head,
    attention biases, 4 kv heads);
  * GPT-J: partial interleaved rotary (rotary_dim 8 of head_dim 16), one shared layer norm, head bias;
  * GPT-NeoX: parallel residual with rotary_pct 0.5; sequential residual with rotary_pct 0.25.
Checked: logits within 1e-4 relative, greedy ragged batches against HF `generate`, sharded safetensors with
an index and `pytorch_model.bin`, `python -m ftjax.convert` round trip, and FasterTransformer-converted
GPT-J / GPT-NeoX folders written with FT's own names and layout (tensor_para_size 2).
"""
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
from ftjax.config import ModelConfig
from tests.conftest import VOCAB, assert_greedy_match, hf_greedy, random_prompts

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _init_(model, seed):
    """Larger-than-default init so tiny models have confident, non-degenerate logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _build(kind, seed=0):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=VOCAB - 1, pad_token_id=0)
    if kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                             intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-5, **common)
        cls = tf.LlamaForCausalLM
    elif kind == "llama3":
        cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2,
                             intermediate_size=80, max_position_embeddings=128, rope_scaling=dict(LLAMA3_ROPE),
                             rope_theta=500000.0, attention_bias=True, tie_word_embeddings=True, **common)
        cls = tf.LlamaForCausalLM
    elif kind == "gptj":
        # FT's GptJ computes layer norms with eps 1e-6: the same model serves the FT-folder test.
        cfg = tf.GPTJConfig(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=128,
                            layer_norm_epsilon=1e-6, **common)
        cls = tf.GPTJForCausalLM
    elif kind == "neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                               max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True, **common)
        cls = tf.GPTNeoXForCausalLM
    elif kind == "neox_seq":
        cfg = tf.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                               max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=False,
                               hidden_act="gelu_new", **common)
        cls = tf.GPTNeoXForCausalLM
    else:
        raise AssertionError(kind)
    return _init_(cls(cfg), seed)


KINDS = ("llama", "llama3", "gptj", "neox", "neox_seq")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for i, kind in enumerate(KINDS):
        path = str(tmp_path_factory.mktemp(kind))
        model = _build(kind, seed=i)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


def _llm(cfg, params):
    return ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=4, max_seq_len=64)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _assert_logits(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


IDS = np.random.RandomState(7).randint(0, VOCAB, size=(3, 23))


def _check_against(model, cfg, params):
    _assert_logits(_llm(cfg, params).logits(IDS.tolist()), _hf_logits(model, IDS))


# ------------------------------------------------------------------------------------------------
def test_configs(models):
    c = ModelConfig.from_hf(json.load(open(os.path.join(models["llama"][0], "config.json"))))
    assert (c.norm, c.gated_ffn, c.activation, c.num_kv_heads, c.position, c.rot_dim, c.attn_bias,
            c.tie_embeddings) == ("rmsnorm", True, "silu", 2, "rotary", 8, False, False)
    c = ModelConfig.from_hf(json.load(open(os.path.join(models["llama3"][0], "config.json"))))
    assert (c.rope_scaling, c.rope_scaling_factor, c.rope_original_max_positions, c.rope_theta) == \
        ("llama3", 4.0, 16, 500000.0)
    c = ModelConfig.from_hf(json.load(open(os.path.join(models["gptj"][0], "config.json"))))
    assert (c.rot_dim, c.rotary_interleaved, c.shared_layernorm, c.lm_head_bias, c.attn_bias) == (8, True, True, True, False)
    c = ModelConfig.from_hf(json.load(open(os.path.join(models["neox_seq"][0], "config.json"))))
    assert (c.rot_dim, c.rotary_interleaved, c.parallel_residual, c.activation) == (4, False, False, "gelu_tanh")
    # The pre-5.x config.json spellings give the same configs.
    old_neox = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                "intermediate_size": 96, "vocab_size": VOCAB, "rotary_pct": 0.25, "rotary_emb_base": 1000,
                "use_parallel_residual": False, "hidden_act": "gelu"}
    c = ModelConfig.from_hf(old_neox)
    assert (c.rot_dim, c.rope_theta, c.parallel_residual) == (4, 1000.0, False)
    old_llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                 "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": VOCAB, "rope_theta": 500000.0,
                 "rope_scaling": dict(LLAMA3_ROPE), "eos_token_id": [5, 6]}
    c = ModelConfig.from_hf(old_llama)
    assert (c.rope_scaling, c.rope_low_freq_factor, c.rope_theta, c.eos_id) == ("llama3", 1.0, 500000.0, 5)
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_hf({**old_llama, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "mistral"})


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(kind, models):
    path, model = models[kind]
    assert detect_format(path) == "hf"
    cfg, params = load_checkpoint(path)  # routes through hf.load_hf by model_type
    if kind == "gptj":
        assert "ln2" not in params["layers_0"] and "bias" in params["lm_head"]
    _check_against(model, cfg, params)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_ragged_batch_matches_hf(kind, models):
    path, model = models[kind]
    llm = _llm(*load_checkpoint(path))
    prompts = random_prompts(np.random.RandomState(11), 4, 1, 17)
    res = llm.generate(prompts, max_new_tokens=10, end_id=None)
    for p, toks in zip(prompts, res.tokens):
        ref, ref_logits = hf_greedy(model, p, 10)
        assert_greedy_match(toks, ref, ref_logits)


def test_llama_gqa_pallas_interpret(models):
    """Grouped-query attention through the Pallas kernels (interpret mode on CPU) gives HF's tokens."""
    path, model = models["llama"]
    cfg, params = load_checkpoint(path)
    llm = ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_batch_size=4, max_seq_len=64)
    prompts = random_prompts(np.random.RandomState(4), 2, 3, 12)
    res = llm.generate(prompts, max_new_tokens=4, end_id=None)
    for p, toks in zip(prompts, res.tokens):
        ref, ref_logits = hf_greedy(model, p, 4)
        assert_greedy_match(toks, ref, ref_logits)


def test_sharded_safetensors_and_bin(models, tmp_path):
    _, llama = models["llama"]
    sharded = str(tmp_path / "sharded")
    llama.save_pretrained(sharded, max_shard_size="60KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    _check_against(llama, *load_checkpoint(sharded))

    for kind in ("neox", "gptj"):  # pytorch_model.bin (NeoX's head saved as embed_out.weight)
        src, model = models[kind]
        binp = str(tmp_path / f"{kind}_bin")
        os.makedirs(binp)
        with open(os.path.join(src, "config.json")) as f, open(os.path.join(binp, "config.json"), "w") as g:
            g.write(f.read())
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(binp, "pytorch_model.bin"))
        assert detect_format(binp) == "hf"
        _check_against(model, *load_checkpoint(binp))


def test_convert_llama_round_trip(models, tmp_path):
    path, model = models["llama3"]
    dst = str(tmp_path / "ftjax_llama")
    r = subprocess.run([sys.executable, "-m", "ftjax.convert", path, dst], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert detect_format(dst) == "ftjax"
    cfg, params = load_checkpoint(dst)
    assert cfg == load_checkpoint(path)[0]
    _check_against(model, cfg, params)


# ------------------------------------------------------------------------------------------------
# FasterTransformer-converted folders, written as FT's converters write them (independently of ftjax).

def _write_ft_gptj(model, out, T):
    """examples/pytorch/gptj/utils/huggingface_gptj_ckpt_convert.py, --n-inference-gpus T."""
    c = model.config
    w = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    d = f"{out}/{T}-gpu"
    os.makedirs(d)

    def save(a, name):
        np.squeeze(a).astype(np.float32).tofile(f"{d}/{name}.bin")

    def split(a, name, axis):
        for r, part in enumerate(np.split(a, T, axis=axis)):
            save(part, f"{name}.{r}")

    cp = configparser.ConfigParser()
    cp["gptj"] = {"model_name": "gptj", "head_num": str(c.n_head), "size_per_head": str(c.n_embd // c.n_head),
                  "inter_size": str(c.n_embd * 4), "num_layer": str(c.n_layer), "rotary_embedding": str(c.rotary_dim),
                  "vocab_size": str(c.vocab_size), "start_id": str(c.bos_token_id), "end_id": str(c.eos_token_id),
                  "weight_data_type": "fp32"}
    with open(f"{d}/config.ini", "w") as f:
        cp.write(f)
    save(w["transformer.wte.weight"], "model.wte")
    for i in range(c.n_layer):
        b, m = f"transformer.h.{i}.", f"model.layers.{i}."
        save(w[b + "ln_1.bias"], m + "input_layernorm.bias")
        save(w[b + "ln_1.weight"], m + "input_layernorm.weight")
        split(w[b + "mlp.fc_in.weight"].T, m + "mlp.dense_h_to_4h.weight", -1)
        split(w[b + "mlp.fc_in.bias"], m + "mlp.dense_h_to_4h.bias", -1)
        split(w[b + "mlp.fc_out.weight"].T, m + "mlp.dense_4h_to_h.weight", 0)
        save(w[b + "mlp.fc_out.bias"], m + "mlp.dense_4h_to_h.bias")
        split(w[b + "attn.out_proj.weight"].T, m + "attention.dense.weight", 0)
        qkv = np.stack([w[b + "attn.q_proj.weight"], w[b + "attn.k_proj.weight"], w[b + "attn.v_proj.weight"]])
        split(qkv.transpose(2, 0, 1), m + "attention.query_key_value.weight", -1)
    save(w["transformer.ln_f.weight"], "model.final_layernorm.weight")
    save(w["transformer.ln_f.bias"], "model.final_layernorm.bias")
    save(w["lm_head.weight"], "model.lm_head.weight")
    save(w["lm_head.bias"], "model.lm_head.bias")


def _write_ft_neox(model, out, T):
    """examples/pytorch/gptneox/utils/huggingface_gptneox_convert.py, -infer_gpu_num T, fp32."""
    c = model.config
    n, hd = c.num_attention_heads, c.hidden_size
    d = f"{out}/{T}-gpu/"
    os.makedirs(d)
    cp = configparser.ConfigParser()
    cp["gptneox"] = {"model_name": "neox", "head_num": str(n), "size_per_head": str(hd // n),
                     "inter_size": str(c.intermediate_size), "num_layer": str(c.num_hidden_layers),
                     "rotary_embedding": str(int(hd // n * c.rope_parameters["partial_rotary_factor"])),
                     "vocab_size": str(c.vocab_size), "start_id": str(c.bos_token_id), "end_id": str(c.eos_token_id),
                     "use_gptj_residual": str(int(c.use_parallel_residual)), "weight_data_type": "fp32"}
    with open(d + "config.ini", "w") as f:
        cp.write(f)
    for name, param in model.named_parameters():
        val = param.detach().float().numpy().astype(np.float32)
        if name == "gpt_neox.embed_in.weight":
            val.tofile(d + "model.wte.bin")
        elif name == "gpt_neox.final_layer_norm.bias":
            val.tofile(d + "model.final_layernorm.bias.bin")
        elif name == "gpt_neox.final_layer_norm.weight":
            val.tofile(d + "model.final_layernorm.weight.bin")
        elif name in ("embed_out.weight", "lm_head.weight"):
            val.tofile(d + "model.lm_head.weight.bin")
        else:
            key, val = name.replace("gpt_neox.", ""), val.T
            if "layernorm" in key:
                val.tofile(d + f"model.{key}.bin")
            elif "attention.dense.bias" in key or "mlp.dense_4h_to_h.bias" in key:
                (val / T if T > 1 else val).tofile(d + f"model.{key}.bin")
            else:
                if "attention.dense.weight" in key or "mlp.dense_4h_to_h.weight" in key:
                    parts = np.split(val, T, axis=0)
                elif "mlp.dense_h_to_4h" in key:
                    parts = np.split(val, T, axis=-1)
                elif "attention.query_key_value.bias" in key:
                    local = val.shape[-1] // 3
                    parts = np.split(val.reshape(n, 3, local // n).transpose(1, 0, 2).reshape(3, local), T, axis=-1)
                elif "attention.query_key_value.weight" in key:
                    local = val.shape[-1] // 3
                    val = val.reshape(val.shape[0], n, 3, local // n).transpose(0, 2, 1, 3).reshape(val.shape[0], 3, local)
                    parts = np.split(val, T, axis=-1)
                else:
                    raise AssertionError(key)
                for j, part in enumerate(parts):
                    part.tofile(d + f"model.{key}.{j}.bin")


@pytest.mark.parametrize("kind", ["gptj", "neox"])
def test_ft_folder_matches_hf(kind, models, tmp_path):
    _, model = models[kind]
    out = str(tmp_path / f"ft_{kind}")
    (_write_ft_gptj if kind == "gptj" else _write_ft_neox)(model, out, 2)
    assert detect_format(out) == "ft"
    cfg, params = load_checkpoint(out)
    assert (cfg.shared_layernorm, cfg.rotary_interleaved) == ((True, True) if kind == "gptj" else (False, False))
    if kind == "neox":
        # FT's GptNeoX runs the tanh GELU; compare against the HF model evaluated the same way.
        import copy

        model = copy.deepcopy(model)
        model.config.hidden_act = "gelu_new"
        for layer in model.gpt_neox.layers:
            from transformers.activations import ACT2FN
            layer.mlp.act = ACT2FN["gelu_new"]
        # FT's layer norms use eps 1e-6.
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.eps = 1e-6
    _check_against(model, cfg, params)


@pytest.mark.parametrize("kind,model_type", [("llama", "LLaMA"), ("gptj", "GPT-J"), ("neox", "GPT-NeoX")])
def test_served_from_repository_by_model_type(kind, model_type, models, tmp_path):
    """FT's config.pbtxt with model_type LLaMA / GPT-J / GPT-NeoX serves the family; answers equal generate."""
    import re

    grpcclient = pytest.importorskip("tritonclient.grpc")
    from ftjax.serve.server import Server, load_models

    path, _ = models[kind]
    d = tmp_path / "repo" / kind
    d.mkdir(parents=True)
    text = open("serve/model_repository/gpt/fastertransformer/config.pbtxt").read()
    text = text.replace('name: "fastertransformer"', f'name: "{kind}"')
    for key, val in (("model_checkpoint_path", path), ("data_type", "fp32"), ("model_type", model_type)):
        text, n = re.subn(rf'(key: "{key}"\s*value: \{{\s*string_value: )"[^"]*"', rf'\1"{val}"', text)
        assert n == 1, key
    (d / "config.pbtxt").write_text(text)
    ms = load_models(model_repository=str(tmp_path / "repo"), max_batch_size=4, max_seq_len=64, attention="xla")
    llm = ms[0].llm
    prompt = [5, 17, 33, 2]
    want = llm.generate([prompt], max_new_tokens=6).tokens[0]
    srv = Server(ms, grpc_port=0, metrics_port=None).start()
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") as c:
            ins = []
            for name, arr in (("input_ids", np.array([prompt], np.uint32)), ("input_lengths", np.array([[4]], np.uint32)),
                              ("request_output_len", np.array([[6]], np.uint32))):
                t = grpcclient.InferInput(name, list(arr.shape), "UINT32")
                t.set_data_from_numpy(arr)
                ins.append(t)
            r = c.infer(kind, ins)
            n = int(r.as_numpy("sequence_length")[0, 0])
            assert r.as_numpy("output_ids")[0, 0, :n].tolist() == prompt + want
    finally:
        srv.stop()
