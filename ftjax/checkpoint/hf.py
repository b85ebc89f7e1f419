"""Hugging Face GPT-2, LLaMA, GPT-J and GPT-NeoX directories (`load_hf` picks by config.json's model_type):
`config.json` + `model.safetensors` (or sharded safetensors with an index) or `pytorch_model.bin`."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.config import ModelConfig, read_json


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory as float32/int numpy arrays, keyed by HF name."""
    st = os.path.join(path, "model.safetensors")
    idx = os.path.join(path, "model.safetensors.index.json")
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st) or os.path.exists(idx):
        from safetensors import safe_open

        files = [st] if os.path.exists(st) else sorted(set(json.load(open(idx))["weight_map"].values()))
        out = {}
        for f in files:
            with safe_open(os.path.join(path, os.path.basename(f)), framework="numpy") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out
    if os.path.exists(binf):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(f"{binf}: reading .bin checkpoints needs torch (pip install 'ftjax[torch]')") from e
        sd = torch.load(binf, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _as_f32(a):
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype != np.float32 else a


def load_gpt2(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, params as a nested dict of float32 numpy arrays in ftjax's layout).
    `progress`, when given, is called with one line per layer converted."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    sd = {k.removeprefix("transformer."): v for k, v in read_state_dict(path).items()}
    d, n, h, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.num_layers

    def get(name):
        if name not in sd:
            raise ValueError(f"{path}: missing weight {name!r}")
        return _as_f32(sd[name])

    flat = {"embed/tokens": get("wte.weight"), "embed/positions": get("wpe.weight"),
            "final_norm/scale": get("ln_f.weight"), "final_norm/bias": get("ln_f.bias")}
    for i in range(L):
        p, o = f"h.{i}.", f"layers_{i}/"
        w = get(p + "attn.c_attn.weight")  # Conv1D [d, 3d] (in, out)
        if w.shape != (d, 3 * n * h):
            raise ValueError(f"{path}: weight {p}attn.c_attn.weight has shape {w.shape}, expected {(d, 3 * n * h)}")
        bq = get(p + "attn.c_attn.bias").reshape(3, n, h)
        wq = w.reshape(d, 3, n, h)
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = wq[:, j]
            flat[o + f"attn/{name}/bias"] = bq[j]
        flat[o + "attn/o/kernel"] = get(p + "attn.c_proj.weight").reshape(n, h, d)
        flat[o + "attn/o/bias"] = get(p + "attn.c_proj.bias")
        flat[o + "ln1/scale"], flat[o + "ln1/bias"] = get(p + "ln_1.weight"), get(p + "ln_1.bias")
        flat[o + "ln2/scale"], flat[o + "ln2/bias"] = get(p + "ln_2.weight"), get(p + "ln_2.bias")
        flat[o + "mlp/wi/kernel"], flat[o + "mlp/wi/bias"] = get(p + "mlp.c_fc.weight"), get(p + "mlp.c_fc.bias")
        flat[o + "mlp/wo/kernel"], flat[o + "mlp/wo/bias"] = get(p + "mlp.c_proj.weight"), get(p + "mlp.c_proj.bias")
        if progress:
            progress(f"HF layer {i + 1}/{L}")
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in sd:
            raise ValueError(f"{path}: tie_word_embeddings is false but lm_head.weight is missing")
        flat["lm_head/kernel"] = _as_f32(sd["lm_head.weight"]).T
    params = nest(flat)
    check_params(cfg, params, path)
    return cfg, params


# ------------------------------------------------------------------------------------------------
# LLaMA, GPT-J, GPT-NeoX: the same decoder by configuration (ModelConfig.from_hf picks the options).

def _getter(path, sd):
    def get(name):
        if name not in sd:
            raise ValueError(f"{path}: missing weight {name!r}")
        return _as_f32(sd[name])
    return get


def _expect(path, name, a, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{path}: weight {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def _linear(path, get, name, n_in, out_shape, bias):
    """torch nn.Linear `name` (weight [out, in]) -> {"kernel": [in, *out_shape], "bias": [*out_shape]}."""
    w = get(name + ".weight")
    _expect(path, name + ".weight", w, (int(np.prod(out_shape)), n_in))
    out = {"kernel": np.ascontiguousarray(w.T).reshape(n_in, *out_shape)}
    if bias:
        out["bias"] = get(name + ".bias").reshape(out_shape)
    return out


def _out_proj(path, get, name, n, h, d, bias):
    """Attention output nn.Linear (weight [d, n*h]) -> kernel [n, h, d]."""
    w = get(name + ".weight")
    _expect(path, name + ".weight", w, (d, n * h))
    out = {"kernel": np.ascontiguousarray(w.T).reshape(n, h, d)}
    if bias:
        out["bias"] = get(name + ".bias")
    return out


def _flatten(prefix, tree):
    return {f"{prefix}/{k}": v for k, v in tree.items()}


def _finish(path, cfg, flat, sd, head_names, progress=None):
    if not cfg.tie_embeddings:
        name = next((k for k in head_names if k in sd), None)
        if name is None:
            raise ValueError(f"{path}: tie_word_embeddings is false but none of {list(head_names)} is present")
        flat["lm_head/kernel"] = np.ascontiguousarray(_as_f32(sd[name]).T)
        if cfg.lm_head_bias:
            bname = name.removesuffix(".weight") + ".bias"
            if bname not in sd:
                raise ValueError(f"{path}: missing weight {bname!r}")
            flat["lm_head/bias"] = _as_f32(sd[bname])
    params = nest(flat)
    check_params(cfg, params, path)
    return cfg, params


def load_llama(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF LlamaForCausalLM directory -> (config, float32 numpy params)."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    sd = read_state_dict(path)
    get = _getter(path, sd)
    d, n, k, h, f, L = cfg.hidden, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers
    flat = {"embed/tokens": get("model.embed_tokens.weight"), "final_norm/scale": get("model.norm.weight")}
    for i in range(L):
        p, o = f"model.layers.{i}.", f"layers_{i}/"
        ab, mb = cfg.attn_bias, cfg.mlp_bias
        flat.update(_flatten(o + "attn/q", _linear(path, get, p + "self_attn.q_proj", d, (n, h), ab)))
        flat.update(_flatten(o + "attn/k", _linear(path, get, p + "self_attn.k_proj", d, (k, h), ab)))
        flat.update(_flatten(o + "attn/v", _linear(path, get, p + "self_attn.v_proj", d, (k, h), ab)))
        flat.update(_flatten(o + "attn/o", _out_proj(path, get, p + "self_attn.o_proj", n, h, d, ab)))
        flat.update(_flatten(o + "mlp/wg", _linear(path, get, p + "mlp.gate_proj", d, (f,), mb)))
        flat.update(_flatten(o + "mlp/wi", _linear(path, get, p + "mlp.up_proj", d, (f,), mb)))
        flat.update(_flatten(o + "mlp/wo", _linear(path, get, p + "mlp.down_proj", f, (d,), mb)))
        flat[o + "ln1/scale"] = get(p + "input_layernorm.weight")
        flat[o + "ln2/scale"] = get(p + "post_attention_layernorm.weight")
        if progress:
            progress(f"HF layer {i + 1}/{L}")
    return _finish(path, cfg, flat, sd, ("lm_head.weight",))


def load_gptj(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF GPTJForCausalLM directory -> (config, float32 numpy params). One layer norm per block."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    sd = read_state_dict(path)
    get = _getter(path, sd)
    d, n, h, f, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers
    flat = {"embed/tokens": get("transformer.wte.weight"),
            "final_norm/scale": get("transformer.ln_f.weight"), "final_norm/bias": get("transformer.ln_f.bias")}
    for i in range(L):
        p, o = f"transformer.h.{i}.", f"layers_{i}/"
        for name, hf_name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            flat.update(_flatten(o + f"attn/{name}", _linear(path, get, p + f"attn.{hf_name}", d, (n, h), False)))
        flat.update(_flatten(o + "attn/o", _out_proj(path, get, p + "attn.out_proj", n, h, d, False)))
        flat.update(_flatten(o + "mlp/wi", _linear(path, get, p + "mlp.fc_in", d, (f,), True)))
        flat.update(_flatten(o + "mlp/wo", _linear(path, get, p + "mlp.fc_out", f, (d,), True)))
        flat[o + "ln1/scale"], flat[o + "ln1/bias"] = get(p + "ln_1.weight"), get(p + "ln_1.bias")
        if progress:
            progress(f"HF layer {i + 1}/{L}")
    return _finish(path, cfg, flat, sd, ("lm_head.weight",))


def load_neox(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF GPTNeoXForCausalLM directory -> (config, float32 numpy params). The fused
    `query_key_value` is per head: output rows ordered [n, 3, h]."""
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    sd = read_state_dict(path)
    get = _getter(path, sd)
    d, n, h, f, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers
    g = "gpt_neox."
    flat = {"embed/tokens": get(g + "embed_in.weight"),
            "final_norm/scale": get(g + "final_layer_norm.weight"), "final_norm/bias": get(g + "final_layer_norm.bias")}
    for i in range(L):
        p, o = f"{g}layers.{i}.", f"layers_{i}/"
        w = _expect(path, p + "attention.query_key_value.weight", get(p + "attention.query_key_value.weight"),
                    (3 * n * h, d))
        wq = np.ascontiguousarray(w.T).reshape(d, n, 3, h)
        bq = get(p + "attention.query_key_value.bias").reshape(n, 3, h) if cfg.attn_bias else None
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = np.ascontiguousarray(wq[:, :, j])
            if cfg.attn_bias:
                flat[o + f"attn/{name}/bias"] = np.ascontiguousarray(bq[:, j])
        flat.update(_flatten(o + "attn/o", _out_proj(path, get, p + "attention.dense", n, h, d, cfg.attn_bias)))
        flat.update(_flatten(o + "mlp/wi", _linear(path, get, p + "mlp.dense_h_to_4h", d, (f,), True)))
        flat.update(_flatten(o + "mlp/wo", _linear(path, get, p + "mlp.dense_4h_to_h", f, (d,), True)))
        flat[o + "ln1/scale"], flat[o + "ln1/bias"] = get(p + "input_layernorm.weight"), get(p + "input_layernorm.bias")
        flat[o + "ln2/scale"] = get(p + "post_attention_layernorm.weight")
        flat[o + "ln2/bias"] = get(p + "post_attention_layernorm.bias")
        if progress:
            progress(f"HF layer {i + 1}/{L}")
    return _finish(path, cfg, flat, sd, ("embed_out.weight", "lm_head.weight"))


_LOADERS = {"gpt2": "load_gpt2", "llama": "load_llama", "gptj": "load_gptj", "gpt_neox": "load_neox"}


def load_hf(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Any supported HF directory, by config.json's `model_type` (gpt2, llama, gptj, gpt_neox)."""
    hf = read_json(os.path.join(path, "config.json"))
    mt = hf.get("model_type")
    if mt not in _LOADERS and mt not in ("t5", "mt5"):
        raise ValueError(f"{path}/config.json: unsupported model_type {mt!r} (architectures="
                         f"{hf.get('architectures')}); this ftjax build loads: {', '.join(_LOADERS)}")
    if mt in ("t5", "mt5"):
        from ftjax.checkpoint.hf_t5 import load_t5

        return load_t5(path, progress=progress)
    return globals()[_LOADERS[mt]](path, progress=progress)
