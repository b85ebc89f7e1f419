"""A prefill GEMM with its bias and activation applied to the float32 accumulator before the one store:
y = act(x @ w + bias). For the MLP's input projection of a long prefill, where XLA runs cuBLAS's GEMM (bias in
its epilogue) and then the activation as a pass of its own over the [tokens, ffn] product (GPT-350M batch 64 x
128 tokens on an H100: 53 us a layer beside the GEMM's 95; 454 us at 1.3B batch 64 x 512; bench/RESULTS.md): XLA
takes no GELU into a cuBLASLt epilogue (bench/gelu_epilogue_probe.py).

Shapes: x [M, K]; w [K, N]; bias [N] or None -> [M, N] in x.dtype. M is padded to the row tile in the wrapper;
K and N must be multiples of their tiles (`supported`).

One program per [block_m, block_n] output tile on a 1-D grid in groups of `group_m` row tiles (the programs
that run together share their W column panels in L2); each loops over K in block_k steps (Triton pipelines the
loads over num_stages) with a float32 accumulator; bias and activation are applied to it, then it is rounded
and stored once. Pallas' Triton lowering (wgmma on sm_90); `interpret=True` runs the same body on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "none")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tiles and launch of `linear_act` (powers of two >= 16)."""
  block_m: int = 128
  block_n: int = 256
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  group_m: int = 8

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      assert v >= 16 and v & (v - 1) == 0, f"GemmConfig.{name}={v} must be a power of two >= 16"
    assert self.num_warps in (1, 2, 4, 8, 16), f"GemmConfig.num_warps={self.num_warps}"
    assert self.num_stages >= 1 and self.group_m >= 1, f"GemmConfig: {self}"


def supported(K: int, N: int, config: GemmConfig | None = None) -> bool:
  """Whether [*, K] x [K, N] fits the tiles (the wrapper pads M only)."""
  c = config or GemmConfig()
  return K % c.block_k == 0 and N % c.block_n == 0


def _erf(z):
  """erf of float32 z to within 1.5e-7 (Abramowitz & Stegun 7.1.26), from exp alone: Pallas' Triton lowering
  has neither erf nor erfc (jax.nn.gelu's exact form)."""
  a = jnp.abs(z)
  t = 1.0 / (1.0 + 0.3275911 * a)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
  r = 1.0 - poly * jnp.exp(-a * a)
  return jnp.where(z < 0, -r, r)


def _act(name: str, y):
  """The model's activation (`ftjax.layers.mlp.activation`) of float32 y; "none": y itself; the exact GELU
  through `_erf`."""
  from ftjax.layers.mlp import activation

  if name == "gelu":
    return 0.5 * y * (1.0 + _erf(y * 0.7071067811865476))
  return y if name == "none" else activation(name, y)


def _tile(i, num_m: int, num_n: int, group_m: int):
  """Program i -> (row tile, column tile): column-major within groups of group_m row tiles."""
  per_group = group_m * num_n
  first = (i // per_group) * group_m
  size = jnp.minimum(num_m - first, group_m)
  within = i % per_group
  return first + within % size, within // size


def _kernel(x_ref, w_ref, *rest, K: int, block_k: int, act: str, has_bias: bool, precision):
  """x_ref [bm, K]; w_ref [K, bn]; (b_ref [bn]); o_ref [bm, bn]."""
  b_ref = rest[0] if has_bias else None
  o_ref = rest[-1]
  bm, bn = o_ref.shape

  def step(k, acc):
    start = pl.multiple_of(k * block_k, block_k)
    a = x_ref[:, pl.ds(start, block_k)]
    b = w_ref[pl.ds(start, block_k), :]
    return acc + C.dot(a, b, precision=precision)

  acc = jax.lax.fori_loop(0, K // block_k, step, jnp.zeros((bm, bn), jnp.float32))
  if b_ref is not None:
    acc = acc + b_ref[...].astype(jnp.float32)[None, :]
  o_ref[...] = _act(act, acc).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("activation", "config", "interpret"))
def linear_act(x, w, bias=None, *, activation: str = "gelu_tanh", config: GemmConfig | None = None,
               interpret: bool = False):
  """act(x @ w + bias): x [M, K]; w [K, N]; bias [N] or None -> [M, N] in x.dtype (float32 accumulation,
  one rounding)."""
  assert x.ndim == 2 and w.ndim == 2, f"x must be [M, K] and w [K, N], got {x.shape} and {w.shape}"
  M, K = x.shape
  assert w.shape[0] == K, f"x has K={K} columns but w has {w.shape[0]} rows"
  N = w.shape[1]
  assert bias is None or bias.shape == (N,), f"bias must be [N]=[{N}], got {bias.shape}"
  assert activation in ACTIVATIONS, f"activation={activation!r} is not one of {ACTIVATIONS}"
  C.check_dtype("x", x)
  assert w.dtype == x.dtype, f"w {w.dtype} and x {x.dtype} differ"
  c = config or GemmConfig()
  assert supported(K, N, c), f"K={K} and N={N} must be multiples of block_k={c.block_k} and block_n={c.block_n}"
  bm = min(c.block_m, max(16, pl.next_power_of_2(M)))
  Mp = pl.cdiv(M, bm) * bm
  if Mp != M:
    x = jnp.pad(x, ((0, Mp - M), (0, 0)))
  num_m, num_n = Mp // bm, N // c.block_n
  tile = functools.partial(_tile, num_m=num_m, num_n=num_n, group_m=c.group_m)
  in_specs = [pl.BlockSpec((bm, K), lambda i: (tile(i)[0], 0)),
              pl.BlockSpec((K, c.block_n), lambda i: (0, tile(i)[1]))]
  args = [x, w]
  if bias is not None:
    in_specs.append(pl.BlockSpec((c.block_n,), lambda i: (tile(i)[1],)))
    args.append(bias)
  kernel = functools.partial(_kernel, K=K, block_k=c.block_k, act=activation, has_bias=bias is not None,
                             precision=C.dot_precision(x.dtype))
  out = pl.pallas_call(
      kernel,
      grid=(num_m * num_n,),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, c.block_n), lambda i: tile(i)),
      out_shape=jax.ShapeDtypeStruct((Mp, N), x.dtype),
      compiler_params=C.triton_compiler_params(c.num_warps, c.num_stages),
      interpret=interpret,
      name="ftjax_linear_act",
  )(*args)
  return out[:M] if Mp != M else out


def linear_act_reference(x, w, bias=None, *, activation: str = "gelu_tanh"):
  """Float32 twin: act(x @ w + bias) from float32 inputs, in x.dtype, with jax's own activations (the exact
  GELU's erf included, not the kernel's `_erf`)."""
  from ftjax.layers.mlp import activation as act

  y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return (y if activation == "none" else act(activation, y)).astype(x.dtype)
