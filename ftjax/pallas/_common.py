"""Small helpers shared by the Pallas attention kernels (no kernels here).

Lowering: every kernel in this package is written against Pallas' *Triton* lowering
(`jax.experimental.pallas.triton`). That lowering is selected by passing its
`CompilerParams` explicitly (Mosaic GPU is Pallas' default GPU lowering in jax 0.10 / 0.11),
and the same kernel body runs on CPU under `interpret=True`, which is what CI uses.
"""
from __future__ import annotations

import functools
import os

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


# Programmatic dependent launch (PDL, Hopper and later). With PDL on, every decode-path kernel (the small-M
# projection, add_stats / add_norm / normalise, the decode attention kernels) begins with
# `griddepcontrol.wait; griddepcontrol.launch_dependents;`: it waits there until the grids it depends on have
# finished and their writes are visible, before any load or store of its own (the projection loads nothing
# before it either), and lets the next kernel be scheduled as soon as all of its own programs have started.
# XLA (jax 0.11, `xla_gpu_enable_pdl` on by default) launches such kernels with programmatic stream
# serialization; where a launch does not, the two instructions do nothing. Measured on an H100 (bench/
# RESULTS.md), outputs bitwise the same: batch-1 decode steps 2.5-4% faster (350M, 1.3B; bf16 and int8), but
# batch-64 steps 3-4% slower, so only kernels of at most PDL_MAX_ROWS rows (tokens) take it.
# None = on where the device can (a CUDA GPU of compute capability 9.0 or more), True / False = always /
# never (True also for lowering without a GPU). FTJAX_PDL=0 / 1 sets it at import. Read when a kernel is
# traced: change it before the first call, or call `jax.clear_caches()` after changing it.
PDL = {"0": False, "1": True}.get(os.environ.get("FTJAX_PDL", ""), None)
PDL_MAX_ROWS = 16
# The order of the two instructions: False = wait, then let the dependents launch (the default); True = let
# them launch first, so a chain of kernels can be resident two deep (not measured alone, bench/RESULTS.md).
PDL_TRIGGER_FIRST = False

_WAIT, _TRIGGER = "griddepcontrol.wait;", "griddepcontrol.launch_dependents;"


@functools.lru_cache(maxsize=None)
def _grid_dependency_primitive(trigger_first: bool = False):
  """The primitive (made on first use, one per order): inline PTX with side effects (`pure=False`: neither
  removed nor moved across the kernel's memory operations), returning its int32 operand."""
  from jax._src import core as jax_core
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as tl
  from jax.interpreters import mlir

  asm = "\n\t".join((_TRIGGER, _WAIT) if trigger_first else (_WAIT, _TRIGGER)) + "\n\tmov.b32 $0, $1;"
  p = jax_core.Primitive("ftjax_grid_dependency_tf" if trigger_first else "ftjax_grid_dependency")
  p.def_abstract_eval(lambda x: jax_core.ShapedArray(x.shape, x.dtype))

  def lower(ctx, x):
    [aval] = ctx.avals_out
    return tt_dialect.elementwise_inline_asm(
        [mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval)], asm, constraints="=r,r", pure=False,
        packed_element=1, args=[x])
  tl.register_lowering(p)(lower)
  return p


@functools.lru_cache(maxsize=None)
def _device_has_pdl() -> bool:
  try:
    d = jax.devices()[0]
    return d.platform == "gpu" and float(getattr(d, "compute_capability", "0")) >= 9.0
  except Exception:   # noqa: BLE001 - no backend, or a ROCm "gfx..." capability: no PDL
    return False


@functools.lru_cache(maxsize=None)
def _primitive_available() -> bool:
  """The primitive is built on jax internals (Pallas' Triton lowering); a jax that moved them runs the
  kernels without PDL (with a warning) rather than failing."""
  try:
    _grid_dependency_primitive()
    return True
  except Exception as e:   # noqa: BLE001
    import logging
    logging.getLogger("ftjax").warning("ftjax: programmatic dependent launch off (%s: %s)", type(e).__name__, e)
    return False


def pdl_on(interpret: bool, rows: int = 1) -> bool:
  """Whether a kernel of `rows` rows (tokens) traced now starts with the grid-dependency wait (see PDL;
  never when interpreted)."""
  if interpret or PDL is False or rows > PDL_MAX_ROWS:
    return False
  return (True if PDL else _device_has_pdl()) and _primitive_available()


def grid_dependency(pdl: bool):
  """Call first in a kernel body: with `pdl`, the wait (see PDL) and a traced int32 zero to add to the
  program ids / index zeros, so every access also depends on it; without, the Python int 0."""
  if not pdl:
    return 0
  v = _grid_dependency_primitive(bool(PDL_TRIGGER_FIRST)).bind(jnp.zeros((1,), jnp.int32))
  return jnp.sum(v)


def load(ref, *, mask=None, other=None):
  """Masked load through the Triton lowering's primitive (works in interpret mode too). Without a mask
  `other` is dropped (the Triton lowering rejects it; the interpreter would not)."""
  if mask is None:
    return pltriton.load(ref)
  return pltriton.load(ref, mask=mask, other=other)


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """2-D matrix product in a Triton-lowered kernel, float32 result (tensor cores for bf16/fp16).

  `jax.experimental.pallas.triton.dot` in jax 0.10 / 0.11 (`pl.dot` is gone from 0.11).
  """
  return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


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
