"""Checkpoint readers and ftjax's own orbax format.

`detect_format(path)` tells the four supported layouts apart by the files present (never by names):
  "ftjax"    ftjax_config.json + params/ (orbax)                      -> orbax_io.load
  "hf"       config.json + model.safetensors[.index.json] / pytorch_model.bin -> hf.load_hf
             (gpt2 / llama / gptj / gpt_neox by config.json's model_type)
  "ft"       config.ini + model.wte.bin (or a single <N>-gpu/ holding them)   -> ft.load_ft
             ([gpt] / [gptj] / [gptneox] section); config.ini + shared.weight_T.bin -> ft_t5.load_ft_t5 (T5)
  "megatron" latest_checkpointed_iteration.txt, model_optim_rng.pt or mp_rank_XX/model_optim_rng.pt
                                                                       -> megatron.load_megatron_gpt
             (a T5 one, with model.language_model.decoder, -> megatron_t5.load_megatron_t5)
  "nemo"     a .nemo archive, a model_weights.ckpt, or model_config.yaml + [mp_rank_XX/]model_weights.ckpt
                                                                       -> megatron_t5.load_nemo_t5
`load_checkpoint(path)` dispatches and checks every key and shape against the model.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

from ftjax.checkpoint.common import check_params
from ftjax.config import ModelConfig

FORMATS = ("hf", "megatron", "ft", "ftjax", "nemo")

_LOOKED_FOR = ("ftjax_config.json + params/ (ftjax)",
               "config.json + model.safetensors / model.safetensors.index.json / pytorch_model.bin (hf)",
               "config.ini + model.wte.bin or shared.weight_T.bin, directly or in one <N>-gpu/ subfolder (ft)",
               "latest_checkpointed_iteration.txt, model_optim_rng.pt or mp_rank_XX/model_optim_rng.pt (megatron)",
               "a .nemo file, or model_config.yaml + model_weights.ckpt / mp_rank_XX/model_weights.ckpt (nemo)")


def _has(path, *names):
    return all(os.path.exists(os.path.join(path, n)) for n in names)


def _is_ft(path):
    return _has(path, "config.ini", "model.wte.bin") or _has(path, "config.ini", "shared.weight_T.bin")


def detect_format(path: str) -> str:
    """"hf" | "megatron" | "ft" | "ftjax" | "nemo", from the files present. ValueError when none fits."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if os.path.basename(path).endswith(".pt"):
            return "megatron"
        if path.endswith((".nemo", ".ckpt")):
            return "nemo"
        raise ValueError(f"{path}: a checkpoint is a directory (or a Megatron model_optim_rng.pt file)")
    if _has(path, "ftjax_config.json", "params"):
        return "ftjax"
    if _has(path, "config.json") and any(_has(path, f) for f in
                                          ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        return "hf"
    if _is_ft(path):
        return "ft"
    entries = sorted(os.listdir(path))
    if any(re.fullmatch(r"\d+-gpu", e) and _is_ft(os.path.join(path, e)) for e in entries):
        return "ft"
    from ftjax.checkpoint.megatron_t5 import is_nemo
    if is_nemo(path):
        return "nemo"
    if _has(path, "latest_checkpointed_iteration.txt") or _has(path, "model_optim_rng.pt") or any(
            re.fullmatch(r"(mp_rank_\d+(_\d+)?|tp_rank_\d+_pp_rank_\d+)", e)
            and _has(os.path.join(path, e), "model_optim_rng.pt") for e in entries):
        return "megatron"
    shown = ", ".join(entries[:12]) + (" ..." if len(entries) > 12 else "") if entries else "nothing (empty)"
    raise ValueError(f"{path}: not a checkpoint ftjax can read; it holds {shown}. Looked for: "
                     + "; ".join(_LOOKED_FOR))


def load_checkpoint(path: str, progress: Callable[[str], None] | None = None,
                    **kwargs) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from any supported checkpoint; every key and shape is checked.

    Converters return float32 numpy trees; an ftjax checkpoint comes back in its stored dtype (pass
    `dtype=` / `shardings=` through kwargs to orbax_io.load). Megatron checkpoints without pickled args
    take `num_heads=`.
    """
    fmt = detect_format(path)
    if fmt == "ftjax":
        from ftjax.checkpoint import orbax_io
        cfg, params = orbax_io.load(path, **kwargs)
    elif fmt == "hf":
        from ftjax.checkpoint import hf
        cfg, params = hf.load_hf(path, progress=progress, **kwargs)
    elif fmt == "ft":
        from ftjax.checkpoint import ft, ft_t5
        if ft_t5.find_ft_t5(path):
            cfg, params = ft_t5.load_ft_t5(path, progress=progress)
        else:
            cfg, params = ft.load_ft(path, progress=progress, **kwargs)
    elif fmt == "nemo":
        from ftjax.checkpoint import megatron_t5
        cfg, params = megatron_t5.load_nemo_t5(path, progress=progress)
    else:
        from ftjax.checkpoint import megatron, megatron_t5
        if megatron_t5.is_megatron_t5(path):
            cfg, params = megatron_t5.load_megatron_t5(path, progress=progress)
        else:
            cfg, params = megatron.load_megatron_gpt(path, progress=progress, **kwargs)
    check_params(cfg, params, path)
    return cfg, params
