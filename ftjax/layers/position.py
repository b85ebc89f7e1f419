"""Rotary position embedding (NeoX/LLaMA half-split and GPT-J interleaved layouts)."""
from __future__ import annotations

import jax.numpy as jnp


def apply_rotary(x, positions, cfg):
    """x [..., heads, h]; positions [...] int32 -> x rotated on its first cfg.rot_dim features."""
    r = cfg.rot_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))  # [r/2]
    ang = positions.astype(jnp.float32)[..., None] * inv                          # [..., r/2]
    cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]             # [..., 1, r/2]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :r], xf[..., r:]
    if cfg.rotary_interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return jnp.concatenate([out, rest], axis=-1).astype(x.dtype)
