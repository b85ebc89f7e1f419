"""Hugging Face GPT-2 directories: `config.json` + `model.safetensors` (or sharded safetensors with an
index) or `pytorch_model.bin`."""
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
