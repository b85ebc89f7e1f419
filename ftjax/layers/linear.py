"""The one linear op of ftjax, and the Flax module that owns a projection's weights.

`linear(x, w, n_in)` contracts the last `n_in` dims of x with the first `n_in` dims of w. It consumes
whatever weight it is handed: a plain array (f32/bf16/f16), or a `QuantizedWeight` (int8 values and
per-output-channel scales) — models never branch on the weight type (DESIGN.md convention 8).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class QuantizedWeight(NamedTuple):
    """Weight-only int8: w ≈ q * scale; q int8 [*in, *out]; scale float [*out] (per output channel)."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape


def linear(x: jax.Array, w: Any, n_in: int = 1) -> jax.Array:
    """x [..., *in]; w [*in, *out] (array or QuantizedWeight) -> [..., *out], float32 accumulation."""
    nx = x.ndim
    dims = (tuple(range(nx - n_in, nx)), tuple(range(n_in)))
    if isinstance(w, QuantizedWeight):
        # The barrier ties the int8 values to this call's activations: inside the decode while loop the
        # weights are loop-invariant and XLA's loop-invariant code motion would otherwise hoist
        # `convert(q)` out of the loop, keeping a dequantised float copy of every weight alive for the
        # whole loop (seen on XLA:CPU). Tied, the convert stays next to its dot, where it fuses.
        x, q = jax.lax.optimization_barrier((x, w.q))
        y = jax.lax.dot_general(x, q.astype(x.dtype), (dims, ((), ())),
                                preferred_element_type=jnp.float32)
        return y * w.scale.astype(jnp.float32)
    return jax.lax.dot_general(x, w.astype(x.dtype), (dims, ((), ())), preferred_element_type=jnp.float32)


def _init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in ** -0.5)


class Linear(nn.Module):
    """y = x @ kernel (+ bias). kernel [*in_shape, *out_shape] with logical axes in_axes + out_axes."""

    in_shape: Sequence[int]
    out_shape: Sequence[int]
    in_axes: Sequence[str]
    out_axes: Sequence[str]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x [..., *in_shape] -> [..., *out_shape] in self.dtype
        fan_in = 1
        for s in self.in_shape:
            fan_in *= s
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_init(fan_in), tuple(self.in_axes) + tuple(self.out_axes)),
            tuple(self.in_shape) + tuple(self.out_shape), self.dtype)
        y = linear(x, kernel, len(self.in_shape))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.normal(0.02), tuple(self.out_axes)),
                              tuple(self.out_shape), self.dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)
