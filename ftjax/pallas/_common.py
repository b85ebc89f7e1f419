"""Small helpers shared by the Pallas attention kernels (no kernels here).

Lowering: every kernel in this package is written against Pallas' *Triton* lowering
(`jax.experimental.pallas.triton`). That lowering is selected by passing its
`CompilerParams` explicitly (Mosaic GPU is Pallas' default GPU lowering in jax 0.10 / 0.11),
and the same kernel body runs on CPU under `interpret=True`, which is what CI uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # jax 0.10 / 0.11: the Triton lowering's public module.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton lowering
  pltriton = None

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Finite "minus infinity": keeps exp() of masked scores at exactly 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = 1.4426950408889634


def triton_compiler_params(num_warps: int, num_stages: int):
  """The Triton lowering's compiler params (name checked for jax 0.10 and 0.11)."""
  if pltriton is None or not hasattr(pltriton, "CompilerParams"):
    raise RuntimeError(
        f"jax {jax.__version__} has no jax.experimental.pallas.triton.CompilerParams; "
        "the ftjax Pallas kernels need Pallas' Triton lowering")
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def load(ref, *, mask=None, other=None):
  """Masked load through the Triton lowering's primitive (works in interpret mode too). Without a mask
  `other` is dropped (the Triton lowering rejects it; the interpreter would not)."""
  if mask is None:
    return pltriton.load(ref)
  return pltriton.load(ref, mask=mask, other=other)


def dot(a, b, *, trans_b=False, precision=None):
  """2-D matrix product in a Triton-lowered kernel, float32 result (tensor cores for bf16/fp16).

  `jax.experimental.pallas.triton.dot` in jax 0.10 / 0.11 (`pl.dot` is gone from 0.11).
  """
  return pltriton.dot(a, b, trans_b=trans_b, precision=precision)


def store(ref, val, *, mask=None):
  return pltriton.store(ref, val, mask=mask)


def default_interpret() -> bool:
  """True where no GPU backend runs the kernels: they are then interpreted."""
  return jax.default_backend() != "gpu"


def check_dtype(name: str, x) -> None:
  assert jnp.dtype(x.dtype) in SUPPORTED_DTYPES, (
      f"{name}.dtype={x.dtype} is not supported; expected one of "
      f"{[str(d) for d in SUPPORTED_DTYPES]}")


def head_dim_padded(head_dim: int) -> int:
  """Triton tiles are powers of two: odd head sizes (80, 96) are padded by masked loads."""
  assert 1 <= head_dim <= 256, f"head_dim={head_dim} is not supported (1..256)"
  return max(16, pl.next_power_of_2(head_dim))


def dot_precision(dtype):
  """fp32 inputs: full-precision dot (Triton would otherwise use tf32)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
