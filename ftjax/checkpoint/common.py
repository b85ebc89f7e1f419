"""Shared checkpoint helpers: validating a converted param tree against the model's own shapes."""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from ftjax.config import ModelConfig


def _flat(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else k))
    else:
        out[prefix] = tree
    return out


def check_params(cfg: ModelConfig, params: dict[str, Any], source: str) -> None:
    """Every key the model needs is present with its exact shape, and nothing else is there.

    Raises ValueError naming the key (and both shapes) that is missing, unexpected or misshapen.
    """
    want = expected_shapes(cfg)

    def shape(k, v):   # an int8 weight's logical [*in, *out]; the int8 embedding table's rows [v, d]
        if hasattr(v, "qt") and k.endswith("embed/tokens"):
            return tuple(v.qt.shape)
        return tuple(v.shape if hasattr(v, "scale") else np.shape(v))

    have = {k: shape(k, v) for k, v in _flat(params).items()}
    check_shapes(want, have, source)


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{'layers_0/attn/q/kernel': shape, ...}: every param the model of `cfg` needs (float layout)."""
    if getattr(cfg, "arch", "gpt") == "t5":
        from ftjax.models import t5 as family
    else:
        from ftjax.models import gpt as family
    shapes, _ = family.abstract_params(cfg)
    return {k: tuple(v.shape) for k, v in _flat(shapes).items()}


def check_shapes(want: dict[str, tuple], have: dict[str, tuple], source: str) -> None:
    """`have` (key -> shape found in `source`) holds exactly the keys of `want` with their shapes.

    Raises ValueError naming the keys that are missing or unexpected, or the first misshapen key with
    both shapes. Unexpected keys that are whole layers (layers_i beyond the config's count) are called so.
    """
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValueError(f"{source}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(set(have) - set(want))
    if extra:
        hint = ""
        layers = sorted({m.group(0) for k in extra if (m := re.match(r"(?:\w+/)?layers_\d+", k))})
        if layers:
            hint = (f" (layers {layers[:4]}{' ...' if len(layers) > 4 else ''} are stored but the config has "
                    "fewer layers)")
        raise ValueError(f"{source}: unexpected weights {extra[:8]}{' ...' if len(extra) > 8 else ''}{hint}")
    for k in sorted(want):
        if tuple(want[k]) != tuple(have[k]):
            raise ValueError(f"{source}: weight {k} has shape {tuple(have[k])}, the config needs {tuple(want[k])}")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def tree_to_numpy(tree):
    return jax.tree.map(np.asarray, tree)
