"""The one linear op of ftjax, and the Flax module that owns a projection's weights.

`linear(x, w, n_in)` contracts the last `n_in` dims of x with the first `n_in` dims of w. It consumes
whatever weight it is handed: a plain array (f32/bf16/f16), or a `QuantizedWeight` (int8 values and
per-output-channel scales) — models never branch on the weight type (DESIGN.md convention 8).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
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


class QuantizedWeightT(NamedTuple):
    """A QuantizedWeight stored transposed: qt int8 [*out, *in] (the input dims contiguous), scale [*out].
    The small-M kernel reads its int8 tiles along K then, which avoids byte-wise shared-memory loads
    (bench/RESULTS.md). `shape` is the logical [*in, *out]."""

    qt: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        n_out = len(self.scale.shape)
        return tuple(self.qt.shape[n_out:]) + tuple(self.qt.shape[:n_out])


# Small-M projections (decode: a few rows against a big weight) through the Pallas kernel of
# ftjax/pallas/small_linear.py instead of XLA's dot: None = off, else {"interpret": bool}. The engine
# turns it on while it traces its decode step (`small_m_kernel`), on a GPU with the Pallas attention
# and no tensor-parallel mesh (the kernel is a custom call XLA's partitioner cannot split).
_SMALL_M = contextvars.ContextVar("ftjax_small_m_linear", default=None)
# Projections of up to this many rows run the kernel; more (prefill, larger batches): XLA's GEMM. 64 with the
# fused path below: a 1.3B bf16 batch-64 decode step 2.70-2.73 -> 2.50-2.52 ms on an H100, 350M the same
# (bench/RESULTS.md, sixteenth session); bf16 at 17-64 rows unfused had not gained (eighth session).
SMALL_M_ROWS = 64
# int8 weights run the kernel up to this many rows (a batch-64 decode step): it dequantises in its tiles, and
# measured 0.86-0.95x XLA's step at batch 64 (bench/RESULTS.md, eighth session)
INT8_SMALL_M_ROWS = 64
FUSED_ROWS = 64     # the fused decode path's row limit


@contextlib.contextmanager
def small_m_kernel(enabled: bool = True, *, interpret: bool = False, fuse: bool = True):
    """While tracing inside: projections of <= SMALL_M_ROWS rows run the Pallas small-M kernel. `fuse`:
    the model may also take the fused decode path (`fused_decode_mode`): split-K partials handed
    straight to the next kernel (residual add + norm, attention with the K/V write) instead of being
    reduced by XLA. fuse: True / "stats" (the next projection normalises its input from row statistics),
    "norm" (a residual add + norm kernel), "stats2" (residual add + statistics, then a normalise kernel);
    bench/RESULTS.md has the A/B that made "stats" the default. "layer": a whole decoder layer as one
    persistent kernel (ftjax/pallas/decode_layer.py) where the model and shapes allow, else "stats"."""
    fuse = "stats" if fuse is True else fuse
    assert fuse in (False, None, "stats", "norm", "stats2", "layer"), f"small_m_kernel: fuse={fuse!r}"
    token = _SMALL_M.set({"interpret": interpret, "fuse": fuse} if enabled else None)
    try:
        yield
    finally:
        _SMALL_M.reset(token)


def _rows(x, n_in: int) -> int:
    """Rows of x as a projection sees them: the product of its leading (non-input) dims."""
    return math.prod(x.shape[: x.ndim - n_in])


def _kernel_mode(x, n_in):
    """The small-M mode dict when it is on, x has rows and a kernel dtype and the step runs one device per
    shard (what every Pallas projection path needs, whatever its row limit), else None."""
    mode = _SMALL_M.get()
    if mode is None or x.ndim < n_in:
        return None
    from ftjax.sharding.mesh import current_attention_mesh
    on = current_attention_mesh()
    if on is not None and on[0].size > 1:
        return None
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32) or _rows(x, n_in) < 1:
        return None
    return mode


def _small_m_mode(x, n_in, ws=None):
    """The small-M mode dict when projections of x (by the weights ws, where known) run the kernel, else None."""
    mode = _kernel_mode(x, n_in)
    if mode is None:
        return None
    rows = _rows(x, n_in)
    if rows <= SMALL_M_ROWS:
        return mode
    quantized = ws is not None and all(isinstance(w, (QuantizedWeight, QuantizedWeightT)) for w in ws)
    return mode if quantized and rows <= INT8_SMALL_M_ROWS else None


class NormedInput(NamedTuple):
    """norm(x) not yet computed: the fused decode path hands this to `linear_parts`, whose kernel normalises
    its input tiles itself. x [M, d]; stats [2, M, C] (ftjax/pallas/add_norm.py's `add_stats`)."""

    x: jax.Array
    stats: jax.Array
    gamma: jax.Array
    beta: Any
    kind: str
    eps: float


def fused_decode_mode(x, n_in: int = 1):
    """The small-M mode dict when projections of x run the kernel and fusion is on, else None."""
    mode = _small_m_mode(x, n_in)
    if mode is None or not mode.get("fuse") or _rows(x, n_in) > FUSED_ROWS:
        return None
    return mode


LAYER_ROWS = 64     # the layer kernel (fuse="layer") takes decode steps of up to this many rows


def layer_decode_mode(x):
    """The small-M mode dict when fuse is "layer" and x (the decode step's [rows, d] activations, <= LAYER_ROWS
    rows, one device per shard) may run each block as one kernel (ftjax/pallas/decode_layer.py), else None."""
    mode = _kernel_mode(x, 1) if x.ndim == 2 else None
    if mode is None or mode.get("fuse") != "layer" or x.shape[0] > LAYER_ROWS:
        return None
    return mode


def linear_parts(x: jax.Array, ws: Sequence[Any], n_in: int = 1) -> list[tuple[jax.Array, Any]]:
    """Projections of x (<= SMALL_M_ROWS rows; the small-M kernel must be on) left unreduced: for each
    w a pair (parts [S, *lead, *out] float32, scale [*out] or None) with linear(x, w) = sum(parts, 0) *
    scale (before any bias), all weights in one kernel launch. For consumers that sum the partials in
    their own kernel (ftjax/pallas/add_norm.py, decode_attention_append). x may be a `NormedInput`: the
    kernel normalises it on the fly."""
    norm = None
    if isinstance(x, NormedInput):
        norm = (x.stats, x.gamma, x.beta, x.kind, x.eps)
        x = x.x
    mode = _small_m_mode(x, n_in)
    assert mode is not None, "linear_parts: the small-M kernel is off for this input"
    from ftjax.pallas.small_linear import small_linear_parts

    lead = x.shape[: x.ndim - n_in]
    flats = [_flat(w, n_in) for w in ws]
    x2 = x.reshape(math.prod(lead), -1)
    parts = small_linear_parts(x2, [f[0] for f in flats], norm=norm, interpret=mode["interpret"],
                               transposed=[f[3] for f in flats])
    out = []
    for p, (_, scale, shape, _) in zip(parts, flats):
        out.append((p.reshape(p.shape[0], *lead, *shape), None if scale is None else scale.reshape(shape)))
    return out


def reduce_parts(part: jax.Array, scale: Any, bias: Any = None) -> jax.Array:
    """The float32 projection from `linear_parts`' (parts, scale), plus bias: sum(parts, 0) * scale + bias."""
    y = jnp.sum(part, axis=0)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


def _flat(w, n_in):
    """-> (2-D weight [K, N] (int8 values for a QuantizedWeight; [N, K] for a QuantizedWeightT), scale [N]
    or None, out shape, transposed)."""
    if isinstance(w, QuantizedWeightT):
        out = tuple(w.scale.shape)
        return w.qt.reshape(math.prod(out), -1), w.scale.reshape(-1), out, True
    if isinstance(w, QuantizedWeight):
        q, scale = w.q, w.scale
    else:
        q, scale = w, None
    k = math.prod(q.shape[:n_in])
    out = tuple(q.shape[n_in:])
    return q.reshape(k, math.prod(out)), (None if scale is None else scale.reshape(-1)), out, False


def linear_many(x: jax.Array, ws: Sequence[Any], n_in: int = 1) -> list[jax.Array]:
    """Several projections of the same x (q/k/v; gate/up): [linear(x, w, n_in) for w in ws], as ONE
    kernel launch when the small-M kernel is on (XLA fuses plain dots of one operand by itself, but
    not custom calls, nor dots behind the int8 barrier)."""
    mode = _small_m_mode(x, n_in, ws)
    if mode is None:
        return [linear(x, w, n_in) for w in ws]
    from ftjax.pallas.small_linear import small_linear

    lead = x.shape[: x.ndim - n_in]
    flats = [_flat(w, n_in) for w in ws]
    x2 = x.reshape(math.prod(lead), -1)
    ys = small_linear(x2, [f[0] for f in flats], [f[1] for f in flats], interpret=mode["interpret"],
                      transposed=[f[3] for f in flats])
    return [y.reshape(*lead, *f[2]) for y, f in zip(ys, flats)]


def fused_linears(mods: Sequence["Linear"], x: jax.Array) -> list[jax.Array]:
    """[m(x) for m in mods] for Linear modules that read the same x, as one small-M kernel launch when
    that kernel is on (their params read directly; at init, and otherwise, each module is called)."""
    n_in = len(mods[0].in_shape)
    if _SMALL_M.get() is None or mods[0].is_initializing():
        return [m(x) for m in mods]
    ps = [m.variables["params"] for m in mods]
    if _small_m_mode(x, n_in, [p["kernel"] for p in ps]) is None:
        return [m(x) for m in mods]
    ys = linear_many(x, [p["kernel"] for p in ps], n_in)
    out = []
    for m, p, y in zip(mods, ps, ys):
        if m.use_bias:
            y = y + p["bias"].astype(jnp.float32)
        out.append(y.astype(m.dtype))
    return out


# XLA's GEMMs (prefill; decode batches over SMALL_M_ROWS): with 16-bit activations the product leaves the
# GEMM in that dtype (accumulated in float32 inside, rounded once) and `Linear` adds its bias in that dtype
# too, so XLA folds the bias into the GEMM instead of writing a float32 product that the next fusion reads
# back: at prefill sizes the float32 products and their bias/convert passes took about a third of the
# prefill's GPU time (bench/RESULTS.md, eighth session). False: float32 products, as before.
LOW_PRECISION_OUT = True


# int8 weights take the 16-bit output only from this many rows (prefill): its GEMM then reads weights
# dequantised with their scales, which XLA materialises; XLA converts int8 weights in memory for its prefill
# GEMMs anyway, but a decode batch's GEMM (64 rows) converts them in its prologue, and scales there made XLA
# materialise them every step (1.3B, 64 rows: 4.65 -> 6.07 ms a step; bench/RESULTS.md, eighth session).
INT8_LOW_PRECISION_ROWS = 1024
# int8 weights of a call with at least this many rows are dequantised to a 16-bit copy before a plain GEMM
# (cuBLAS, as float weights; the admit call of such prefills is compiled with cuBLAS allowed: Engine._admit_big).
# None: never. 4096 (twentieth session, H100, bench/request_phases.py, one engine per process, ABAB): 1.3B int8
# batch 64 512/32 284.1/283.3 -> 275.6/273.1 ms; 128/8 60.4/60.9 -> 58.9/57.9; 350M 512/32 126.6/126.6 ->
# 123.5/123.6. Prefills below 4096 rows (batch 1) keep XLA's Triton GEMMs with the conversion in their tiles.
INT8_DEQUANT_ROWS = 4096


def int8_dequantised(rows: int) -> bool:
    """Whether a call of `rows` rows dequantises its int8 weights before a plain GEMM (INT8_DEQUANT_ROWS)."""
    return INT8_DEQUANT_ROWS is not None and rows >= INT8_DEQUANT_ROWS


def _low_precision(x, w=None, n_in: int = 1) -> bool:
    if not (LOW_PRECISION_OUT and x.dtype in (jnp.bfloat16, jnp.float16)):
        return False
    if isinstance(w, (QuantizedWeight, QuantizedWeightT)):
        return _rows(x, n_in) >= INT8_LOW_PRECISION_ROWS
    return True


def product_dtype(x, w, n_in: int, dtype) -> Any:
    """The dtype a projection's product (and its bias add) is computed in, for a module of `dtype`: x's 16-bit
    dtype where `_low_precision` allows it, the module keeps that dtype and XLA runs the GEMM; else float32."""
    low = (_low_precision(x, w, n_in) and jnp.dtype(dtype) == x.dtype and _small_m_mode(x, n_in, (w,)) is None)
    return x.dtype if low else jnp.float32


def linear(x: jax.Array, w: Any, n_in: int = 1, out_dtype: Any = None) -> jax.Array:
    """x [..., *in]; w [*in, *out] (array, QuantizedWeight or QuantizedWeightT) -> [..., *out], float32
    accumulation; the result in float32, or in `out_dtype` (the XLA path only: the small-M kernel's output
    is float32 whatever it is asked)."""
    if _small_m_mode(x, n_in, (w,)) is not None:
        return linear_many(x, (w,), n_in)[0]
    out_dtype = jnp.float32 if out_dtype is None else out_dtype
    nx = x.ndim
    dims = (tuple(range(nx - n_in, nx)), tuple(range(n_in)))
    if isinstance(w, (QuantizedWeight, QuantizedWeightT)):
        # The barrier ties the int8 values to this call's activations: inside the decode while loop the
        # weights are loop-invariant and XLA's loop-invariant code motion would otherwise hoist
        # `convert(q)` out of the loop, keeping a dequantised float copy of every weight alive for the
        # whole loop (seen on XLA:CPU). Tied, the convert stays next to its dot, where it fuses.
        n_out = len(w.scale.shape)
        if isinstance(w, QuantizedWeightT):   # q [*out, *in]: contract its trailing dims
            q, dims = w.qt, (dims[0], tuple(range(n_out, n_out + n_in)))
            scale = w.scale.reshape(w.scale.shape + (1,) * n_in)
        else:
            q, scale = w.q, w.scale
        x, q = jax.lax.optimization_barrier((x, q))
        # A 16-bit product: the scales go into the weights as they are converted (XLA converts the int8 values
        # for its GEMM anyway), so nothing scales the product afterwards; a float32 product is scaled after.
        low = jnp.dtype(out_dtype) != jnp.float32
        wq = (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype) if low else q.astype(x.dtype)
        if int8_dequantised(_rows(x, n_in)):
            # A large prefill: the GEMM is compute-bound, so the weights are dequantised into a 16-bit copy by
            # a kernel of their own (one weight at a time, tied to x above; this barrier keeps the convert out
            # of the GEMM), and the GEMM is a plain 16-bit one, on cuBLAS where the call allows it.
            wq = jax.lax.optimization_barrier(wq)
        y = jax.lax.dot_general(x, wq, (dims, ((), ())), preferred_element_type=out_dtype)
        return y if low else y * w.scale.astype(jnp.float32)
    return jax.lax.dot_general(x, w.astype(x.dtype), (dims, ((), ())), preferred_element_type=out_dtype)


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
    low_out: bool = True   # False: a float32 product and bias add whatever the dtype (the lm_head: logits)

    @nn.compact
    def __call__(self, x):  # x [..., *in_shape] -> [..., *out_shape] in self.dtype
        fan_in = 1
        for s in self.in_shape:
            fan_in *= s
        if self.has_variable("params", "kernel") and isinstance(self.get_variable("params", "kernel"),
                                                               QuantizedWeightT):
            # Read directly: flax's shape check compares the first leaf, which is stored transposed.
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param(
                "kernel", nn.with_logical_partitioning(_init(fan_in), tuple(self.in_axes) + tuple(self.out_axes)),
                tuple(self.in_shape) + tuple(self.out_shape), self.dtype)
        n_in = len(self.in_shape)
        acc = product_dtype(x, kernel, n_in, self.dtype) if self.low_out else jnp.float32
        y = linear(x, kernel, n_in, out_dtype=acc)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.normal(0.02), tuple(self.out_axes)),
                              tuple(self.out_shape), self.dtype)
            y = y + bias.astype(acc)
        return y.astype(self.dtype)
