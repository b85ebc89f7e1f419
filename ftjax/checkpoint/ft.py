"""FasterTransformer's own converted GPT (and, below, GPT-J / GPT-NeoX) folders: what `huggingface_gpt_convert.py` and
`megatron_ckpt_convert.py` (examples/pytorch/gpt/utils) write into `{out}/{N}-gpu/`, the folder a Triton
`model_checkpoint_path` points at, and what `ParallelGptWeight.cc` / `ParallelGptDecoderLayerWeight.cc`
read.

Layout (T = tensor_para_size, d = head_num * size_per_head, f = inter_size, v = vocab_size,
p = max_pos_seq_len; every file a raw little-endian array, C order, of `weight_data_type` (fp32 / fp16 /
bf16) with no header):

  config.ini                                        [gpt] head_num, size_per_head, inter_size, num_layer,
                                                    vocab_size, max_pos_seq_len, start_id, end_id,
                                                    weight_data_type, tensor_para_size, layernorm_eps, ...
  model.wte.bin                                     [v, d]
  model.wpe.bin                                     [p, d]
  model.final_layernorm.{weight,bias}.bin           [d]
  model.lm_head.weight.bin                          [v, d]  (optional: untied output embedding)
  model.layers.{i}.input_layernorm.{weight,bias}.bin             [d]
  model.layers.{i}.attention.query_key_value.weight.{r}.bin      [d, 3, d/T]
  model.layers.{i}.attention.query_key_value.bias.{r}.bin        [3, d/T]
  model.layers.{i}.attention.dense.weight.{r}.bin                [d/T, d]
  model.layers.{i}.attention.dense.bias.bin                      [d]
  model.layers.{i}.post_attention_layernorm.{weight,bias}.bin    [d]
  model.layers.{i}.mlp.dense_h_to_4h.weight.{r}.bin              [d, f/T]
  model.layers.{i}.mlp.dense_h_to_4h.bias.{r}.bin                [f/T]
  model.layers.{i}.mlp.dense_4h_to_h.weight.{r}.bin              [f/T, d]
  model.layers.{i}.mlp.dense_4h_to_h.bias.bin                    [d]

Each rank's d/T columns hold its np = n/T heads, head-major ([np, h]). The path may also be the folder
one level up (holding `1-gpu/`, `2-gpu/`, ...): a single `*-gpu` subfolder is used, several are refused.
A file whose byte size differs from its shape is an error naming the file and both sizes. FT's own
defaults apply to absent keys (`layernorm_eps` 1e-6, `activation_type` Gelu = tanh GELU).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.config import ModelConfig, _Ini, read_ini

log = logging.getLogger("ftjax")

_WEIGHT_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": "bfloat16"}


def _warn_extra_layers(root: str, num_layers: int) -> None:
    """log.warning when `root` holds layer files beyond config.ini's num_layer (they are not read)."""
    extra = sorted({int(m.group(1)) for f in os.listdir(root)
                    if (m := re.match(r"model\.layers\.(\d+)\.", f)) and int(m.group(1)) >= num_layers})
    if extra:
        log.warning("%s: files of layers %s are present but config.ini's num_layer is %d; they are not used",
                    root, extra[:8], num_layers)


def resolve_dir(path: str) -> str:
    """The folder holding config.ini: `path` itself or its single `*-gpu` subfolder."""
    if os.path.exists(os.path.join(path, "config.ini")):
        return path
    subs = sorted(s for s in (os.listdir(path) if os.path.isdir(path) else [])
                  if re.fullmatch(r"\d+-gpu", s) and os.path.exists(os.path.join(path, s, "config.ini")))
    if len(subs) == 1:
        return os.path.join(path, subs[0])
    if len(subs) > 1:
        raise ValueError(f"{path}: several FasterTransformer folders {subs}; pass the one to load")
    raise ValueError(f"{path}: no FasterTransformer config.ini here or in a '<N>-gpu' subfolder")


def _np_dtype(name: str, ini: str = "config.ini"):
    name = name.strip().lower()
    for key, dt in _WEIGHT_DTYPES.items():  # FT matches by substring (getModelFileType)
        if key in name:
            if dt == "bfloat16":
                import ml_dtypes
                return ml_dtypes.bfloat16
            return dt
    raise ValueError(f"{ini}: unsupported weight_data_type {name!r} (expected fp32, fp16 or bf16)")


class RawFiles:
    """FT's raw little-endian weight files in one folder: `read(name, shape)` checks the byte size
    (errors name the file and both sizes); `ranks(name, shape, axis)` joins `name.{r}.bin` over the
    T tensor-parallel ranks."""

    def __init__(self, root: str, dtype, T: int = 1):
        self.root, self.dtype, self.T = root, np.dtype(dtype), T

    def read(self, name, shape):
        fn = os.path.join(self.root, name)
        if not os.path.exists(fn):
            raise ValueError(f"{self.root}: missing weight file {name}")
        want, got = int(np.prod(shape)) * self.dtype.itemsize, os.path.getsize(fn)
        if got != want:
            raise ValueError(f"{fn}: {got} bytes, but shape {tuple(shape)} of {self.dtype.name} needs {want} bytes")
        return np.fromfile(fn, dtype=self.dtype.newbyteorder("<")).astype(np.float32).reshape(shape)

    def ranks(self, name, shape, axis):
        return np.concatenate([self.read(f"{name}.{r}.bin", shape) for r in range(self.T)], axis=axis)


def load_ft_gpt(path: str, progress: Callable[[str], None] | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, params as a nested dict of float32 numpy arrays in ftjax's layout)."""
    say = progress or (lambda msg: None)
    root = resolve_dir(path)
    ini = os.path.join(root, "config.ini")
    cfg = ModelConfig.from_ft_ini(ini)
    sec = _Ini(read_ini(ini)["gpt"], ini)
    dtype = _np_dtype(sec.get("weight_data_type", "fp32"), ini)
    T = sec.int("tensor_para_size", 1)
    if sec.int("pipeline_para_size", 1) != 1:
        raise ValueError(f"{ini}: pipeline_para_size {sec.get('pipeline_para_size')} is not supported")
    d, n, h, f, L = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers
    v, p = cfg.vocab_size, cfg.max_positions
    if T < 1 or n % T or f % T:
        raise ValueError(f"{ini}: tensor_para_size {T} must divide head_num {n} and inter_size {f}")
    npr = n // T

    read = RawFiles(root, dtype, T).read

    lm_head = os.path.exists(os.path.join(root, "model.lm_head.weight.bin"))
    if lm_head:
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    flat = {"embed/tokens": read("model.wte.bin", (v, d)), "embed/positions": read("model.wpe.bin", (p, d)),
            "final_norm/scale": read("model.final_layernorm.weight.bin", (d,)),
            "final_norm/bias": read("model.final_layernorm.bias.bin", (d,))}
    if lm_head:
        flat["lm_head/kernel"] = np.ascontiguousarray(read("model.lm_head.weight.bin", (v, d)).T)
    for i in range(L):
        pre, o = f"model.layers.{i}.", f"layers_{i}/"
        qkv_w = np.concatenate([read(pre + f"attention.query_key_value.weight.{r}.bin", (d, 3, npr, h))
                                for r in range(T)], axis=2)  # [d, 3, n, h]
        qkv_b = np.concatenate([read(pre + f"attention.query_key_value.bias.{r}.bin", (3, npr, h))
                                for r in range(T)], axis=1)  # [3, n, h]
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = np.ascontiguousarray(qkv_w[:, j])
            flat[o + f"attn/{name}/bias"] = qkv_b[j]
        flat[o + "attn/o/kernel"] = np.concatenate(
            [read(pre + f"attention.dense.weight.{r}.bin", (npr, h, d)) for r in range(T)], axis=0)
        flat[o + "attn/o/bias"] = read(pre + "attention.dense.bias.bin", (d,))
        flat[o + "ln1/scale"] = read(pre + "input_layernorm.weight.bin", (d,))
        flat[o + "ln1/bias"] = read(pre + "input_layernorm.bias.bin", (d,))
        flat[o + "ln2/scale"] = read(pre + "post_attention_layernorm.weight.bin", (d,))
        flat[o + "ln2/bias"] = read(pre + "post_attention_layernorm.bias.bin", (d,))
        flat[o + "mlp/wi/kernel"] = np.concatenate(
            [read(pre + f"mlp.dense_h_to_4h.weight.{r}.bin", (d, f // T)) for r in range(T)], axis=1)
        flat[o + "mlp/wi/bias"] = np.concatenate(
            [read(pre + f"mlp.dense_h_to_4h.bias.{r}.bin", (f // T,)) for r in range(T)], axis=0)
        flat[o + "mlp/wo/kernel"] = np.concatenate(
            [read(pre + f"mlp.dense_4h_to_h.weight.{r}.bin", (f // T, d)) for r in range(T)], axis=0)
        flat[o + "mlp/wo/bias"] = read(pre + "mlp.dense_4h_to_h.bias.bin", (d,))
        say(f"FT layer {i + 1}/{L} ({T} rank file{'s' if T > 1 else ''} each)")
    params = nest(flat)
    check_params(cfg, params, root)
    _warn_extra_layers(root, L)
    return cfg, params


# ------------------------------------------------------------------------------------------------
# GPT-J and GPT-NeoX folders: FT's examples/pytorch/gptj/utils/huggingface_gptj_ckpt_convert.py and
# examples/pytorch/gptneox/utils/huggingface_gptneox_convert.py (T = tensor_para_size; n heads of h):
#
#   [gptj]   head_num, size_per_head, inter_size, num_layer, rotary_embedding, vocab_size, start_id,
#            end_id, weight_data_type (always fp32 from FT's converter)
#     model.wte.bin [v, d]; model.final_layernorm.{weight,bias}.bin [d]
#     model.lm_head.weight.bin [v, d]; model.lm_head.bias.bin [v]
#     model.layers.{i}.input_layernorm.{weight,bias}.bin           [d]  (the one norm of the block)
#     model.layers.{i}.attention.query_key_value.weight.{r}.bin    [d, 3, d/T]   (no qkv bias)
#     model.layers.{i}.attention.dense.weight.{r}.bin              [d/T, d]      (no bias)
#     model.layers.{i}.mlp.dense_h_to_4h.{weight,bias}.{r}.bin     [d, f/T], [f/T]
#     model.layers.{i}.mlp.dense_4h_to_h.weight.{r}.bin            [f/T, d]
#     model.layers.{i}.mlp.dense_4h_to_h.bias.bin                  [d]
#
#   [gptneox] as [gptj] plus use_gptj_residual (1 = parallel residual); weights as GPT's layout:
#     model.wte.bin, model.final_layernorm.*, model.lm_head.weight.bin (no bias)
#     model.layers.{i}.{input,post_attention}_layernorm.{weight,bias}.bin
#     model.layers.{i}.attention.query_key_value.weight.{r}.bin    [d, 3, d/T] (HF's [n, 3, h] regrouped)
#     model.layers.{i}.attention.query_key_value.bias.{r}.bin      [3, d/T]
#     model.layers.{i}.attention.dense.weight.{r}.bin [d/T, d]; attention.dense.bias.bin [d] (stored / T)
#     model.layers.{i}.mlp.dense_h_to_4h.{weight,bias}.{r}.bin; mlp.dense_4h_to_h.weight.{r}.bin
#     model.layers.{i}.mlp.dense_4h_to_h.bias.bin [d] (stored / T)
#   The converter divides the two output biases by T when T > 1 (each rank adds its share before the
#   all-reduce); they are multiplied back here. `mlp.attention.bias.sum.bin` (their sum) is not needed.

def _section(ini: str):
    cp = read_ini(ini)
    for fam in ("gpt", "gptj", "gptneox"):
        if fam in cp:
            return fam, _Ini(cp[fam], ini)
    raise ValueError(f"config.ini: {ini} has no [gpt], [gptj] or [gptneox] section (sections: {cp.sections()})")


def load_ft(path: str, progress: Callable[[str], None] | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Any FT-converted decoder folder, by its config.ini section: [gpt], [gptj] or [gptneox]."""
    root = resolve_dir(path)
    fam, _ = _section(os.path.join(root, "config.ini"))
    if fam == "gpt":
        return load_ft_gpt(path, progress=progress)
    return _load_ft_rotary(root, fam, progress or (lambda msg: None))


def _load_ft_rotary(root: str, fam: str, say) -> tuple[ModelConfig, dict[str, Any]]:
    ini = os.path.join(root, "config.ini")
    cfg = ModelConfig.from_ft_ini(ini)
    _, sec = _section(ini)
    dtype = np.dtype(_np_dtype(sec.get("weight_data_type", "fp32"), ini))
    # FT's GPT-J / NeoX converters write no tensor_para_size (the Triton config.pbtxt carried it): the
    # rank files of layer 0 tell it.
    qkv0 = "model.layers.0.attention.query_key_value.weight.{}.bin"
    found = 0
    while os.path.exists(os.path.join(root, qkv0.format(found))):
        found += 1
    T = sec.int("tensor_para_size", found or 1)
    if found and found != T:
        raise ValueError(f"{ini}: tensor_para_size {T}, but layer 0 has {found} query_key_value rank files")
    d, n, h, f, L, v = cfg.hidden, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim, cfg.num_layers, cfg.vocab_size
    if T < 1 or n % T or f % T:
        raise ValueError(f"{ini}: tensor_para_size {T} must divide head_num {n} and inter_size {f}")
    npr, fr = n // T, f // T

    files = RawFiles(root, dtype, T)
    read, ranks = files.read, files.ranks

    if not os.path.exists(os.path.join(root, "model.lm_head.weight.bin")):
        raise ValueError(f"{root}: missing weight file model.lm_head.weight.bin")
    has_bias = os.path.exists(os.path.join(root, "model.lm_head.bias.bin"))
    if has_bias != cfg.lm_head_bias:
        cfg = dataclasses.replace(cfg, lm_head_bias=has_bias)
    flat = {"embed/tokens": read("model.wte.bin", (v, d)),
            "final_norm/scale": read("model.final_layernorm.weight.bin", (d,)),
            "final_norm/bias": read("model.final_layernorm.bias.bin", (d,)),
            "lm_head/kernel": np.ascontiguousarray(read("model.lm_head.weight.bin", (v, d)).T)}
    if has_bias:
        flat["lm_head/bias"] = read("model.lm_head.bias.bin", (v,))
    out_scale = T if fam == "gptneox" else 1  # NeoX's converter stores the output biases divided by T
    for i in range(L):
        pre, o = f"model.layers.{i}.", f"layers_{i}/"
        qkv_w = ranks(pre + "attention.query_key_value.weight", (d, 3, npr, h), 2)  # [d, 3, n, h]
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = np.ascontiguousarray(qkv_w[:, j])
        flat[o + "attn/o/kernel"] = ranks(pre + "attention.dense.weight", (npr, h, d), 0)
        if cfg.attn_bias:
            qkv_b = ranks(pre + "attention.query_key_value.bias", (3, npr, h), 1)  # [3, n, h]
            for j, name in enumerate("qkv"):
                flat[o + f"attn/{name}/bias"] = qkv_b[j]
            flat[o + "attn/o/bias"] = read(pre + "attention.dense.bias.bin", (d,)) * out_scale
        flat[o + "ln1/scale"] = read(pre + "input_layernorm.weight.bin", (d,))
        flat[o + "ln1/bias"] = read(pre + "input_layernorm.bias.bin", (d,))
        if not cfg.shared_layernorm:
            flat[o + "ln2/scale"] = read(pre + "post_attention_layernorm.weight.bin", (d,))
            flat[o + "ln2/bias"] = read(pre + "post_attention_layernorm.bias.bin", (d,))
        flat[o + "mlp/wi/kernel"] = ranks(pre + "mlp.dense_h_to_4h.weight", (d, fr), 1)
        flat[o + "mlp/wi/bias"] = ranks(pre + "mlp.dense_h_to_4h.bias", (fr,), 0)
        flat[o + "mlp/wo/kernel"] = ranks(pre + "mlp.dense_4h_to_h.weight", (fr, d), 0)
        flat[o + "mlp/wo/bias"] = read(pre + "mlp.dense_4h_to_h.bias.bin", (d,)) * out_scale
        say(f"FT {fam} layer {i + 1}/{L} ({T} rank file{'s' if T > 1 else ''} each)")
    params = nest(flat)
    check_params(cfg, params, root)
    _warn_extra_layers(root, L)
    return cfg, params
