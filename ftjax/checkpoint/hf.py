"""Hugging Face GPT-2, LLaMA, GPT-J and GPT-NeoX directories (`load_hf` picks by config.json's model_type):
`config.json` + `model.safetensors` (or sharded safetensors with an index) or `pytorch_model.bin`."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.config import ModelConfig, read_json

log = logging.getLogger("ftjax")


def read_config(path: str) -> ModelConfig:
    fn = os.path.join(path, "config.json")
    return ModelConfig.from_hf(read_json(fn), source=fn)


def warn_unused(path: str, sd: dict, used: set, what: str = "tensors") -> None:
    """log.warning naming the source tensors the model did not read (e.g. config.json's layer count is
    smaller than the layers stored)."""
    unused = sorted(set(sd) - set(used))
    if unused:
        log.warning("%s: %d %s in the checkpoint are not used by the model its config describes: %s%s",
                    path, len(unused), what, unused[:8], " ..." if len(unused) > 8 else "")


def _shard_files(path: str, idx: str) -> list[str]:
    """The safetensors shards a `model.safetensors.index.json` names (in order), checked to exist."""
    index = read_json(idx)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        found = "no 'weight_map'" if wm is None else f"'weight_map' = {str(wm)[:60]}"
        raise ValueError(f"{idx}: expected a 'weight_map' object (tensor name -> shard file), found {found}")
    bad = sorted({str(v) for v in wm.values() if not isinstance(v, str) or not v})
    if bad:
        raise ValueError(f"{idx}: 'weight_map' names invalid shard files {bad[:4]}")
    files = sorted(set(wm.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, os.path.basename(f)))]
    if missing:
        raise ValueError(f"{idx}: shard files {missing[:4]}{' ...' if len(missing) > 4 else ''} named in "
                         f"'weight_map' are not in {path}")
    return files


def _mib(fn: str) -> str:
    return f"{os.path.getsize(fn) / 2**20:.1f} MiB"


def read_state_dict(path: str, progress=None) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory as float32/int numpy arrays, keyed by HF name. `progress`,
    when given, is called once per file read. A file that cannot be read raises ValueError naming it."""
    say = progress or (lambda msg: None)
    st = os.path.join(path, "model.safetensors")
    idx = os.path.join(path, "model.safetensors.index.json")
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st) or os.path.exists(idx):
        from safetensors import safe_open

        files = [st] if os.path.exists(st) else _shard_files(path, idx)
        out = {}
        for i, f in enumerate(files):
            fn = os.path.join(path, os.path.basename(f))
            t0 = time.perf_counter()
            try:
                with safe_open(fn, framework="numpy") as fh:
                    for k in fh.keys():
                        out[k] = fh.get_tensor(k)
            except (OSError, ValueError) as e:
                raise ValueError(f"{fn}: cannot read safetensors file ({' '.join(str(e).split())})") from None
            except Exception as e:   # safetensors' SafetensorError (header / truncation), not an OSError
                if type(e).__name__ != "SafetensorError":
                    raise
                raise ValueError(f"{fn}: not a valid safetensors file, truncated or corrupt "
                                 f"({' '.join(str(e).split())})") from None
            say(f"read HF shard {i + 1}/{len(files)}: {os.path.basename(fn)} ({_mib(fn)}, "
                f"{time.perf_counter() - t0:.1f}s; {len(out)} tensors so far)")
        return out
    if os.path.exists(binf):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(f"{binf}: reading .bin checkpoints needs torch (pip install 'ftjax[torch]')") from e
        t0 = time.perf_counter()
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:   # truncated zip (OSError / RuntimeError), bad pickle (UnpicklingError), ...
            raise ValueError(f"{binf}: cannot read the torch checkpoint, truncated or corrupt "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
        if not isinstance(sd, dict) or not all(hasattr(v, "is_floating_point") for v in sd.values()):
            raise ValueError(f"{binf}: expected a state dict (tensor name -> tensor), found {type(sd).__name__}")
        say(f"read HF file 1/1: {os.path.basename(binf)} ({_mib(binf)}, {time.perf_counter() - t0:.1f}s; "
            f"{len(sd)} tensors)")
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _as_f32(a):
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype != np.float32 else a


def _getter(path, sd, shown=None):
    """get(name, shape=None) -> float32 array; ValueError naming a missing one, or (with shape) one of another
    shape; shown: the checkpoint's own name of a key, for the messages. get.used: the names read."""
    shown = shown or {}

    def get(name, shape=None):
        if name not in sd:
            raise ValueError(f"{path}: missing weight {name!r}")
        get.used.add(name)
        a = _as_f32(sd[name])
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{path}: weight {shown.get(name, name)} has shape {tuple(a.shape)}, "
                             f"expected {tuple(shape)}")
        return a
    get.used = set()
    return get


def load_gpt2(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, params as a nested dict of float32 numpy arrays in ftjax's layout).
    `progress`, when given, is called with one line per layer converted."""
    cfg = read_config(path)
    raw = read_state_dict(path, progress=progress)
    sd = {k.removeprefix("transformer."): v for k, v in raw.items()}
    names = {k.removeprefix("transformer."): k for k in raw}
    d, n, h, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.num_layers
    get = _getter(path, sd, names)

    flat = {"embed/tokens": get("wte.weight"), "embed/positions": get("wpe.weight"),
            "final_norm/scale": get("ln_f.weight"), "final_norm/bias": get("ln_f.bias")}
    for i in range(L):
        p, o = f"h.{i}.", f"layers_{i}/"
        f = cfg.ffn_dim
        w = get(p + "attn.c_attn.weight", (d, 3 * n * h))  # Conv1D [d, 3d] (in, out)
        bq = get(p + "attn.c_attn.bias", (3 * n * h,)).reshape(3, n, h)
        wq = w.reshape(d, 3, n, h)
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = wq[:, j]
            flat[o + f"attn/{name}/bias"] = bq[j]
        flat[o + "attn/o/kernel"] = get(p + "attn.c_proj.weight", (n * h, d)).reshape(n, h, d)
        flat[o + "attn/o/bias"] = get(p + "attn.c_proj.bias", (d,))
        flat[o + "ln1/scale"], flat[o + "ln1/bias"] = get(p + "ln_1.weight", (d,)), get(p + "ln_1.bias", (d,))
        flat[o + "ln2/scale"], flat[o + "ln2/bias"] = get(p + "ln_2.weight", (d,)), get(p + "ln_2.bias", (d,))
        flat[o + "mlp/wi/kernel"] = get(p + "mlp.c_fc.weight", (d, f))
        flat[o + "mlp/wi/bias"] = get(p + "mlp.c_fc.bias", (f,))
        flat[o + "mlp/wo/kernel"] = get(p + "mlp.c_proj.weight", (f, d))
        flat[o + "mlp/wo/bias"] = get(p + "mlp.c_proj.bias", (d,))
        if progress:
            progress(f"HF layer {i + 1}/{L}")
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in sd:
            raise ValueError(f"{path}: tie_word_embeddings is false but lm_head.weight is missing")
        flat["lm_head/kernel"] = _as_f32(sd["lm_head.weight"]).T
        get.used.add("lm_head.weight")
    params = nest(flat)
    check_params(cfg, params, path)
    # non-persistent buffers some transformers versions saved (attn.bias / attn.masked_bias masks) are not weights
    warn_unused(path, {names[k]: v for k, v in sd.items() if (not k.endswith(("attn.bias", "attn.masked_bias"))
                       or k.endswith("c_attn.bias")) and not (cfg.tie_embeddings and k == "lm_head.weight")},
                {names[k] for k in get.used})
    return cfg, params


# ------------------------------------------------------------------------------------------------
# LLaMA, GPT-J, GPT-NeoX: the same decoder by configuration (ModelConfig.from_hf picks the options).

def _linear(path, get, name, n_in, out_shape, bias):
    """torch nn.Linear `name` (weight [out, in]) -> {"kernel": [in, *out_shape], "bias": [*out_shape]}."""
    w = get(name + ".weight", (int(np.prod(out_shape)), n_in))
    out = {"kernel": np.ascontiguousarray(w.T).reshape(n_in, *out_shape)}
    if bias:
        out["bias"] = get(name + ".bias", (int(np.prod(out_shape)),)).reshape(out_shape)
    return out


def _out_proj(path, get, name, n, h, d, bias):
    """Attention output nn.Linear (weight [d, n*h]) -> kernel [n, h, d]."""
    w = get(name + ".weight", (d, n * h))
    out = {"kernel": np.ascontiguousarray(w.T).reshape(n, h, d)}
    if bias:
        out["bias"] = get(name + ".bias", (d,))
    return out


def _flatten(prefix, tree):
    return {f"{prefix}/{k}": v for k, v in tree.items()}


def _finish(path, cfg, flat, sd, head_names, progress=None, used=None):
    used = set() if used is None else used
    if not cfg.tie_embeddings:
        name = next((k for k in head_names if k in sd), None)
        if name is None:
            raise ValueError(f"{path}: tie_word_embeddings is false but none of {list(head_names)} is present")
        flat["lm_head/kernel"] = np.ascontiguousarray(_as_f32(sd[name]).T)
        used.add(name)
        if cfg.lm_head_bias:
            bname = name.removesuffix(".weight") + ".bias"
            if bname not in sd:
                raise ValueError(f"{path}: missing weight {bname!r}")
            flat["lm_head/bias"] = _as_f32(sd[bname])
            used.add(bname)
    params = nest(flat)
    check_params(cfg, params, path)
    # rotary caches and causal masks some transformers versions saved as buffers are not weights
    # (and a tied head saved beside the embedding is the embedding)
    warn_unused(path, {k: v for k, v in sd.items() if not k.endswith((".rotary_emb.inv_freq", ".attn.bias",
                                                                     ".attn.masked_bias", ".attention.bias",
                                                                     ".attention.masked_bias"))
                       and not (cfg.tie_embeddings and k in head_names)}, used)
    return cfg, params


def load_llama(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF LlamaForCausalLM directory -> (config, float32 numpy params)."""
    cfg = read_config(path)
    sd = read_state_dict(path, progress=progress)
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
    return _finish(path, cfg, flat, sd, ("lm_head.weight",), used=get.used)


def load_gptj(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF GPTJForCausalLM directory -> (config, float32 numpy params). One layer norm per block."""
    cfg = read_config(path)
    sd = read_state_dict(path, progress=progress)
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
    return _finish(path, cfg, flat, sd, ("lm_head.weight",), used=get.used)


def load_neox(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """HF GPTNeoXForCausalLM directory -> (config, float32 numpy params). The fused
    `query_key_value` is per head: output rows ordered [n, 3, h]."""
    cfg = read_config(path)
    sd = read_state_dict(path, progress=progress)
    get = _getter(path, sd)
    d, n, h, f, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers
    g = "gpt_neox."
    flat = {"embed/tokens": get(g + "embed_in.weight"),
            "final_norm/scale": get(g + "final_layer_norm.weight"), "final_norm/bias": get(g + "final_layer_norm.bias")}
    for i in range(L):
        p, o = f"{g}layers.{i}.", f"layers_{i}/"
        w = get(p + "attention.query_key_value.weight", (3 * n * h, d))
        wq = np.ascontiguousarray(w.T).reshape(d, n, 3, h)
        bq = get(p + "attention.query_key_value.bias", (3 * n * h,)).reshape(n, 3, h) if cfg.attn_bias else None
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
    return _finish(path, cfg, flat, sd, ("embed_out.weight", "lm_head.weight"), used=get.used)


_LOADERS = {"gpt2": "load_gpt2", "llama": "load_llama", "gptj": "load_gptj", "gpt_neox": "load_neox"}


def load_hf(path: str, progress=None) -> tuple[ModelConfig, dict[str, Any]]:
    """Any supported HF directory, by config.json's `model_type` (gpt2, llama, gptj, gpt_neox)."""
    hf = read_json(os.path.join(path, "config.json"))
    mt = hf.get("model_type")
    if mt not in _LOADERS and mt not in ("t5", "mt5"):
        raise ValueError(f"{os.path.join(path, 'config.json')}: unsupported model_type {mt!r} (architectures="
                         f"{hf.get('architectures')}); this ftjax build loads: {', '.join(_LOADERS)}")
    if mt in ("t5", "mt5"):
        from ftjax.checkpoint.hf_t5 import load_t5

        return load_t5(path, progress=progress)
    return globals()[_LOADERS[mt]](path, progress=progress)
