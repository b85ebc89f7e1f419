"""Rotary position embedding (NeoX/LLaMA half-split and GPT-J interleaved layouts; LLaMA-3 scaling)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_inv_freq(cfg) -> np.ndarray:
    """Inverse frequencies [r/2] float32 for cfg.rot_dim, computed in float32 as HF does; with
    cfg.rope_scaling == "llama3" the LLaMA-3.1 frequency-dependent scaling: wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than original_max / high_freq_factor
    kept, and those between interpolated smoothly."""
    r = cfg.rot_dim
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, r, 2).astype(np.float32) / np.float32(r))))
    inv = inv.astype(np.float32)
    if cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_positions
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rotary(x, positions, cfg):
    """x [..., heads, h]; positions [...] int32 -> x rotated on its first cfg.rot_dim features."""
    r = cfg.rot_dim
    inv = jnp.asarray(rope_inv_freq(cfg))                                          # [r/2]
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
