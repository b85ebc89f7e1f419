"""ftjax's own checkpoint format: an orbax PyTree checkpoint plus a JSON config.

  dst/ftjax_config.json   {"format": "ftjax", "format_version": 1, "dtype": "bfloat16", "config": cfg.to_dict()}
                          (+ "quantize": "int8" when the projection kernels are int8 + scales)
  dst/params/             orbax (tensorstore) checkpoint of the param tree, stored in `dtype`

`load(path, shardings=...)` restores each array straight onto its `jax.sharding.Sharding`, so in a
multi-host run every process reads only the shards it owns; without shardings it returns host numpy
arrays.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from ftjax.config import DTYPES, ModelConfig, T5Config, read_json

CONFIG_FILE = "ftjax_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def _np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; expected one of {DTYPES}")
    import ml_dtypes

    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]


def is_ftjax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save(dst: str, cfg: ModelConfig, params: dict[str, Any], dtype: str = "float32") -> None:
    """Writes `params` (cast to `dtype`) and the config under `dst` (created; must not hold a checkpoint)."""
    import orbax.checkpoint as ocp

    npd = _np_dtype(dtype)
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"{dst}: exists and is not a directory; choose an empty or new destination directory")
    if os.path.exists(os.path.join(dst, PARAMS_DIR)):
        raise ValueError(f"{dst}: already holds an ftjax checkpoint ({PARAMS_DIR}/); choose an empty destination")
    os.makedirs(dst, exist_ok=True)

    def cast(x):  # floating leaves -> dtype; anything else (int scales, ids) as it is
        a = np.asarray(x)
        return a.astype(npd) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a

    from ftjax.quantize import is_quantized, to_storage

    # int8 weights as {"q", "scale"} dicts, the form `load` regroups (ftjax.quantize.from_storage)
    tree = jax.tree.map(cast, to_storage(params))
    ocp.PyTreeCheckpointer().save(os.path.join(dst, PARAMS_DIR), tree)
    meta = {"format": "ftjax", "format_version": FORMAT_VERSION, "dtype": dtype, "config": cfg.to_dict()}

    if is_quantized(params):  # QuantizedWeight kernels are stored as {"q" int8, "scale"} (ftjax.quantize)
        meta["quantize"] = "int8"
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_meta(path: str) -> dict[str, Any]:
    fn = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(fn):
        raise ValueError(f"{path}: no {CONFIG_FILE}")
    meta = read_json(fn)   # a JSON object, or ValueError naming the file
    if meta.get("format") != "ftjax":
        raise ValueError(f"{fn}: 'format' is {meta.get('format')!r}, expected 'ftjax'")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{fn}: format_version {meta.get('format_version')} is newer than this ftjax "
                         f"({FORMAT_VERSION})")
    if "config" not in meta:
        raise ValueError(f"{fn}: missing 'config'")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{fn}: 'config' must be a JSON object, found {type(meta['config']).__name__}")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{fn}: 'dtype' is {meta.get('dtype')!r}, expected one of {DTYPES}")
    return meta


def read_config(path: str, meta: dict[str, Any] | None = None):
    """The ModelConfig / T5Config stored in `path`/ftjax_config.json; errors name the file."""
    meta = read_meta(path) if meta is None else meta
    conf = dict(meta["config"])
    try:
        return T5Config.from_dict(conf) if conf.get("arch") == "t5" else ModelConfig.from_dict(conf)
    except ValueError as e:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)}: {e}") from None


def stored_metadata(path: str):
    """orbax's metadata tree of `path`/params (shapes and dtypes; no array is read)."""
    import orbax.checkpoint as ocp

    pdir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    try:
        stored = ocp.PyTreeCheckpointer().metadata(pdir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{pdir}: cannot read the orbax checkpoint's metadata ({type(e).__name__}: {e})") from None
    stored = getattr(stored, "item_metadata", stored)
    return getattr(stored, "tree", stored)


def stored_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{'layers_0/attn/q/kernel': shape, ...} of the arrays stored in `path`/params, from orbax's metadata."""
    out = {}

    def walk(tree, prefix):
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = tuple(getattr(tree, "shape", ()) or ())
    walk(stored_metadata(path), "")
    return out


def stored_dtype(path: str) -> str:
    return read_meta(path)["dtype"]


def load(path: str, dtype: str | None = None, shardings: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, params). `dtype` casts while restoring (None: as stored). `shardings`: a tree
    (matching the params) of `jax.sharding.Sharding` to restore onto; None -> host numpy arrays."""
    import orbax.checkpoint as ocp

    meta = read_meta(path)
    cfg = read_config(path, meta)
    pdir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    ckpt = ocp.PyTreeCheckpointer()
    stored = stored_metadata(path)
    want = _np_dtype(dtype) if dtype is not None else None

    def is_float(m):
        return np.issubdtype(np.dtype(m.dtype), np.floating) or np.dtype(m.dtype).name == "bfloat16"

    if shardings is None:
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray,
                                                      dtype=want if want is not None and is_float(m) else None),
                            stored)
    else:
        from ftjax.quantize import to_storage

        s_flat, s_def = jax.tree.flatten(to_storage(shardings))
        m_flat, m_def = jax.tree.flatten(stored)
        if s_def != m_def:
            raise ValueError(f"{path}: the shardings tree does not match the stored params "
                             f"({len(s_flat)} vs {len(m_flat)} leaves)")
        args = jax.tree.unflatten(m_def, [
            ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(m.shape),
                                 dtype=want if want is not None and is_float(m) else None)
            for s, m in zip(s_flat, m_flat)])
    params = ckpt.restore(pdir, restore_args=args)
    if meta.get("quantize"):
        from ftjax.quantize import from_storage

        params = from_storage(params)
    return cfg, params
