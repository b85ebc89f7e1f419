"""A whole decoder layer of the decode step (M <= 16 rows) as ONE kernel: a persistent grid.

Why. At batch 1..16 the decode step streams every weight once; the kernel-per-op step (the fused path of
ftjax/models/gpt.py: 8 kernels a layer) pays each kernel boundary: the launch, the ramp until the first
weight tiles arrive from HBM, and the tail while the slowest program finishes — about 3.5 us per projection
on an H100 beyond its bytes (bench/RESULTS.md), a quarter of a GPT 1.3B step. Here one launch runs the
layer's five phases on a grid of `programs` (one per SM by default) that stay resident and hand data to each
other through global memory, with counters for the dependencies instead of kernel boundaries:

  qkv   x [M, D] normalised on the fly (LN1 / RMSNorm from the row statistics the previous layer wrote)
        times Wq, Wk, Wv -> q, k, v rounded to the dtype, biases added
  attn  per (row, kv head, key split): the new K/V written into the cache (in place: the caches are aliased),
        attention over keys [0, position] with the new key from registers (flash-decoding splits)
  o     attention output times Wo; + bias + residual -> x_mid (rounded) and its row statistics
  fc1   norm(x_mid) times W1 (+ bias), activation -> h (rounded)
  fc2   h times W2; + bias + x_mid -> x_out (rounded) and its row statistics (the next layer's norm input)

Measured (H100, bench/RESULTS.md, tenth session): correct, and SLOWER than the kernel-per-op step — 1.3B
batch 1 1.54 vs 1.37 ms bf16, 1.44 vs 1.05 ms int8; 350M batch 64 2.55 vs 1.47 ms. Per layer (1.3B, 2 rows,
bench/layer_trace.py) four hand-offs of ~2.5 us and a ~6 us attention phase stream no weights, and the
projection phases run at 1.8-2.6 TB/s bf16 / 1.1-1.5 TB/s int8 with one program per SM; no LayerConfig
knob changed that. It stays opt-in (FTJAX_DECODE_FUSE=layer).

Work split. Each projection phase splits its weight's tiles over the programs "stream-K" style: the
(column block j, K block kb) iterations of a weight, column-major, are cut into `P_w` equal contiguous
ranges, one per program, so every program streams the same number of bytes whatever the shapes; a phase
with several weights (q, k, v) gives each weight a share of the programs proportional to its tiles. A
program walks its range in ONE loop (Triton pipelines the weight loads across column blocks). Where its
range ends a column block, it stores its float32 partial sum into a slot of the block and counts itself in
on the block's counter (an atomic add); the program that arrives last sums the block's partials in slot
order (deterministic: the order never depends on who arrives when), applies the epilogue (scale, bias,
residual, activation, statistics) and counts the block done on the phase's counter. A phase that needs the
previous one (attention needs q/k/v; o the attention output; fc1 all of x_mid, for its norm; fc2 all of h)
spins on that counter first. Programs never wait for work of a later phase, and `programs` never exceeds
what the GPU holds at once (one program per SM), so every wait ends.

Memory order. A producer stores, then all its threads meet at a barrier, then one thread adds to the
counter with acq_rel semantics at GPU scope; a consumer reads the counter with the same atomics (spinning:
an atomic add of 0) before it loads. When the last program leaves it zeroes the counters, so the next
launch (the next layer) finds them at 0; the caller creates them zeroed once per decode step.

Shapes (M rows <= 16 (the batch), D hidden, n heads, k kv heads, h head_dim (a power of two), F the MLP's
width, s the cache capacity; weights [K, N], or [N, K] for int8 stored transposed):
  x [M, D] dtype, stats [2, M, C] float32 (sum / sum of squares of x's rows over C column chunks),
  wq [D, n*h], wk / wv [D, k*h], wo [n*h, D], w1 [D, F], w2 [F, D] (float, or int8 with scales [N]),
  biases [N] or None, norm scales / biases [D], k_cache / v_cache [M, k, s, h] (donated, updated in place),
  positions [M] int32 (where each row's new token goes; keys [0, positions] are attended)
  -> x_out [M, D] dtype, stats_out [2, M, C'] float32, k_cache, v_cache, counters.

Interpret mode (CPU) runs programs one after another, so a program cannot wait for a later one: it runs
either one program that does everything, or (`phased`) one launch per phase with P programs each, which
exercises the multi-program split, the partial slots and the last-arriver fixups.
Lowering: Pallas' Triton lowering, as the other kernels of this package.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ftjax.pallas import _common as C
from ftjax.pallas.add_norm import mean_rstd, scale_shift
from ftjax.pallas.small_linear import dequant_int8, resolve_dequant, tile_rows

MAX_ROWS = 64             # M rows of the decode step (the batch); the x tile has tile_rows(M) rows: 16, 32, 64
ACC_ELEMS = 16 * 256      # a projection's float32 accumulator tile holds at most this many elements (R x block_n)
PHASES = ("norm1", "qkv", "attn", "o", "norm2", "fc1", "fc2")
NORM_CHUNK = 128          # columns a program normalises at a time in the norm phases
# Time stamps of `decode_layer_traced` (per program, %globaltimer_lo in ns; 0: the program has none there)
EVENTS = ("start", "qkv_wait", "qkv_done", "attn_wait", "attn_done", "o_wait", "o_done", "fc1_wait", "fc1_done",
          "fc2_wait", "fc2_done", "exit")
EV = {name: i for i, name in enumerate(EVENTS)}
TRACE_EVENTS = 16
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """Tunables of the layer kernel.

  programs: the grid (None: the GPU's SM count times `programs_per_sm`; 1 when interpreted). Every program
    must be resident at once: the default, one per SM, always is.
  num_warps, num_stages: Triton launch / software-pipelining depth of the weight stream.
  row_bytes: bytes of a weight row in a tile (None: 256 for 16-bit weights, 128 for int8 and float32);
    tile_bytes: bytes of a weight tile (the other tile dim is the rest).
  attn_block: keys per attention loop step; attn_splits: key splits per (row, kv head) (None: enough to
    give every program one unit).
  dequant: int8 -> float conversion of the weight tiles (small_linear's `dequant`).
  prefetch_tiles: a program waiting for the previous phase first loads its first this many weight tiles of
    the next one into the L2 (0: off), so the weight stream restarts from the L2 once the wait is over.
  prenorm: normalise x and x_mid once, in phases of their own (norm1, norm2), instead of in every x tile of
    the projections that read them (None: when the x tile has more than 16 rows, where normalising each tile
    again for every column block costs 33 instructions per KB of weight against 10 (bench/layer_sass.py)).
  spin_sleep_ns: a waiting program sleeps this long between reads of the counter (0: it re-reads at once),
    so fewer atomics queue on the counter its producers are adding to.
  """
  programs: int | None = None
  programs_per_sm: int = 1
  num_warps: int = 8
  num_stages: int = 3
  row_bytes: int | None = None
  tile_bytes: int = 16384
  attn_block: int = 64
  attn_splits: int | None = None
  dequant: str = "auto"
  prefetch_tiles: int = 0
  prenorm: bool | None = None
  spin_sleep_ns: int = 0

  def __post_init__(self):
    assert self.programs is None or self.programs >= 1, f"LayerConfig.programs={self.programs} must be >= 1"
    assert self.programs_per_sm >= 1, f"LayerConfig.programs_per_sm={self.programs_per_sm} must be >= 1"
    assert self.num_warps in (1, 2, 4, 8, 16), f"LayerConfig.num_warps={self.num_warps}"
    assert self.num_stages >= 1, f"LayerConfig.num_stages={self.num_stages}"
    assert self.attn_block >= 16 and self.attn_block & (self.attn_block - 1) == 0, (
        f"LayerConfig.attn_block={self.attn_block} must be a power of two >= 16")
    assert self.attn_splits is None or self.attn_splits >= 1, f"LayerConfig.attn_splits={self.attn_splits}"
    assert 0 <= self.prefetch_tiles <= 16, f"LayerConfig.prefetch_tiles={self.prefetch_tiles} must be in 0..16"
    assert 0 <= self.spin_sleep_ns <= 100000, f"LayerConfig.spin_sleep_ns={self.spin_sleep_ns} must be in 0..1e5"


DEFAULT_CONFIG = LayerConfig()


def device_sms() -> int | None:
  """The default device's multiprocessor count (None where the backend does not say)."""
  try:
    n = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:
    return None
  return int(n) if n else None


def default_programs(config: LayerConfig, interpret: bool) -> int:
  """The grid: config.programs, else one program per SM times programs_per_sm (1 when interpreted). Every
  program must be resident at once (they wait for each other): one per SM always is; more per SM only where
  the compiled kernel's registers and shared memory let the SM hold them (bench/layer_sass.py shows both)."""
  if config.programs is not None:
    return config.programs
  if interpret:
    return 1
  sms = device_sms()
  if sms is None:
    raise ValueError("decode_layer: the device does not report its multiprocessor count; pass "
                     "LayerConfig(programs=...) (at most the programs the GPU holds at once)")
  return sms * config.programs_per_sm


def grid_known(interpret: bool) -> bool:
  """Whether the default grid can be sized here (interpreted, or a device that reports its SMs)."""
  return interpret or DEFAULT_CONFIG.programs is not None or device_sms() is not None


# ----------------------------------------------------------------------------------------------- plan
class WeightPlan(NamedTuple):
  """One weight of a projection phase, split stream-K over programs [p0, p0 + P)."""
  K: int
  N: int
  bn: int
  bk: int
  trans: bool      # stored [N, K]
  p0: int          # first program
  P: int           # programs
  slots: int       # most partials a column block collects
  cnt0: int        # offset of its column blocks' counters

  @property
  def nb(self) -> int:
    return -(-self.N // self.bn)

  @property
  def nkb(self) -> int:
    return -(-self.K // self.bk)

  @property
  def T(self) -> int:
    return self.nb * self.nkb


def _pow2_floor(v: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(v, 1)))))


def _tiles(K: int, N: int, itemsize: int, trans: bool, config: LayerConfig, cap_n=None, cap_k=None):
  """(block_n, block_k) of a weight's tiles: `row_bytes` along the stored row, `tile_bytes` in all; block_n
  at most cap_n (the q/k/v weights: a column block stays inside one head), block_k at most cap_k (the o
  weight: a K block stays inside one head)."""
  row_bytes = config.row_bytes or (256 if itemsize == 2 else 128)
  max_n = min(max(16, pl.next_power_of_2(N)), cap_n or 1 << 30)
  max_k = min(max(16, pl.next_power_of_2(K)), cap_k or 1 << 30)
  if trans:   # a tile row runs along K
    bk = min(max_k, max(16, row_bytes // itemsize))
    bn = min(max_n, max(16, min(256, _pow2_floor(config.tile_bytes / (bk * itemsize)))))
  else:
    bn = min(max_n, max(16, row_bytes // itemsize))
    bk = min(max_k, max(16, min(256, _pow2_floor(config.tile_bytes / (bn * itemsize)))))
  return bn, bk


def _q_of(it: int, P: int, T: int) -> int:
  """The program (0..P-1) whose stream-K range [q*T//P, (q+1)*T//P) holds iteration it."""
  return ((it + 1) * P - 1) // T


def _split_programs(P: int, sizes) -> list[tuple[int, int]]:
  """(first program, programs) per weight, in proportion to `sizes`; every weight gets all P programs when
  there are fewer programs than weights."""
  n = len(sizes)
  if P < n or n == 1:
    return [(0, P)] * n
  tot = sum(sizes)
  share = [max(1, round(P * s / tot)) for s in sizes]
  while sum(share) > P:
    share[share.index(max(share))] -= 1
  while sum(share) < P:
    share[share.index(min(share))] += 1
  out, p0 = [], 0
  for s in share:
    out.append((p0, s))
    p0 += s
  return out


def plan_phase(P: int, shapes, cnt0: int, config: LayerConfig, shared_counters: bool = False, cap_n=None,
               cap_k=None, R: int = 16) -> list[WeightPlan]:
  """shapes: [(K, N, itemsize, trans)] of the phase's weights -> their plans (counters from cnt0 on; with
  shared_counters all weights count on the first one's: equal shapes, one epilogue per column block). R: the
  x tile's rows (block_n is capped so that the [R, block_n] accumulator stays ACC_ELEMS)."""
  cap_n = min(cap_n or ACC_ELEMS, ACC_ELEMS // R)
  tiles = [_tiles(K, N, isz, tr, config, cap_n, cap_k) for K, N, isz, tr in shapes]
  sizes = [(-(-N // bn)) * (-(-K // bk)) for (K, N, _, _), (bn, bk) in zip(shapes, tiles)]
  plans = []
  c0 = cnt0
  for (K, N, _, tr), (bn, bk), (p0, Pw) in zip(shapes, tiles, _split_programs(P, sizes)):
    nb, nkb = -(-N // bn), -(-K // bk)
    T = nb * nkb
    Pw = min(Pw, T)   # no program with an empty range: a column block's contributors are then consecutive
    slots = max(_q_of((j + 1) * nkb - 1, Pw, T) - _q_of(j * nkb, Pw, T) + 1 for j in range(nb))
    plans.append(WeightPlan(K, N, bn, bk, tr, p0, Pw, slots, c0))
    if not shared_counters:
      c0 += nb
  return plans


class LayerPlan(NamedTuple):
  P: int
  M: int
  R: int            # rows of the x / accumulator tiles: tile_rows(M)
  D: int
  n: int
  kvh: int
  h: int
  F: int
  s_cap: int
  qkv: tuple
  o: WeightPlan
  fc1: tuple        # (w1,) or (w1 "up", wg "gate") sharing counters
  fc2: WeightPlan
  att_splits: int
  att_block: int
  prenorm: bool
  norm_chunks: int
  # counter offsets
  n1_done: int
  n2_done: int
  qkv_done: int
  att_grp: int
  att_done: int
  o_done: int
  f1_done: int
  exit: int
  n_counters: int

  @property
  def gated(self) -> bool:
    return len(self.fc1) == 2


def make_plan(P: int, M: int, D: int, n: int, kvh: int, h: int, F: int, s_cap: int, witems, wtrans,
              config: LayerConfig, gated: bool = False) -> LayerPlan:
  """witems / wtrans: itemsize and transposed flag of (wq, wk, wv, wo, w1, w2, [wg])."""
  R = tile_rows(M)
  phase = functools.partial(plan_phase, config=config, R=R)
  prenorm = R > 16 if config.prenorm is None else bool(config.prenorm)
  c = 0
  qkv = phase(P, [(D, n * h, witems[0], wtrans[0]), (D, kvh * h, witems[1], wtrans[1]),
                  (D, kvh * h, witems[2], wtrans[2])], c, cap_n=h)
  c = qkv[-1].cnt0 + qkv[-1].nb
  qkv_done = c
  c += 1
  att_grp = c
  c += M * kvh
  att_done = c
  c += 1
  (o,) = phase(P, [(n * h, D, witems[3], wtrans[3])], c, cap_k=h)
  c += o.nb
  o_done = c
  c += 1
  fc1 = phase(P, [(D, F, witems[4], wtrans[4])] + ([(D, F, witems[6], wtrans[6])] if gated else []), c,
              shared_counters=True)
  c += fc1[0].nb
  f1_done = c
  c += 1
  (fc2,) = phase(P, [(F, D, witems[5], wtrans[5])], c)
  c += fc2.nb
  ex = c
  n1_done, n2_done = c + 1, c + 2
  c += 3
  block = min(config.attn_block, s_cap)
  while s_cap % block:
    block //= 2
  splits = config.attn_splits or max(1, min(P // max(1, M * kvh), -(-s_cap // block)))
  return LayerPlan(P, M, R, D, n, kvh, h, F, s_cap, tuple(qkv), o, tuple(fc1), fc2, splits, block, prenorm,
                   -(-D // NORM_CHUNK), n1_done, n2_done, qkv_done, att_grp, att_done, o_done, f1_done, ex, c)


# --------------------------------------------------------------------------------------------- helpers
def _and(a, b):
  if a is None:
    return b
  return a if b is None else a & b


class _Sync:
  """Counters in global memory (int32 ref): arrive (release) and wait (acquire). In interpret mode the
  programs run one after another: a barrier among a program's threads is meaningless and is skipped.
  A wait spins on atomic adds of 0 (a loop of plain or volatile loads whose value is not otherwise used
  is removed by Triton's optimiser; an atomic is never removed, and it acquires)."""

  def __init__(self, cnt_ref, zero, interpret: bool, sleep_ns: int = 0):
    self.ref, self.zero, self.interpret, self.sleep_ns = cnt_ref, zero, interpret, sleep_ns

  def barrier(self):
    if not self.interpret:
      C.pltriton.debug_barrier()

  def arrive(self, idx, val=1):
    """All threads' earlier stores, then +val on counter idx; the value before."""
    self.barrier()
    return C.pltriton.atomic_add(self.ref, (self.zero + idx,), self.zero + val)

  def read(self, idx):
    return C.pltriton.atomic_add(self.ref, (self.zero + idx,), self.zero)

  def _pause(self):
    """0, after sleeping sleep_ns (GPU; an opaque 0 the compiler cannot fold, so the sleep stays in the loop)."""
    if not self.sleep_ns or self.interpret:
      return self.zero
    [v] = C.pltriton.elementwise_inline_asm(
        f"nanosleep.u32 {int(self.sleep_ns)};\nmov.b32 $0, $1;", args=[jnp.zeros((1,), jnp.int32) + self.zero],
        constraints="=r,r", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
    return jnp.sum(v)

  def wait(self, idx, target):
    """Spin until counter idx >= target (each read an acquiring atomic: it also orders the loads after); with
    sleep_ns, each retry first sleeps (fewer atomics on the counter while its producers arrive)."""
    def retry(v):
      return C.pltriton.atomic_add(self.ref, (self.zero + idx,), self._pause())
    return jax.lax.while_loop(lambda v: v < target, retry, self.read(idx))


_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(x):
  """erf on float32 by a rational fit on [-4, 4] (~1e-7 absolute; the Triton lowering has no erf)."""
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = jnp.full_like(x, _ERF_P[0])
  for c in _ERF_P[1:]:
    p = p * x2 + c
  q = jnp.full_like(x, _ERF_Q[0])
  for c in _ERF_Q[1:]:
    q = q * x2 + c
  return x * p / q


def kernel_activation(name: str, x):
  """`ftjax.layers.mlp.activation` in ops the Triton lowering has (float32 in and out)."""
  if name == "gelu":
    return 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))
  if name == "gelu_tanh":
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
  if name == "relu":
    return jnp.maximum(x, 0.0)
  if name == "silu":
    return x / (1.0 + jnp.exp(-x))
  raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def _span(w: WeightPlan, j):
  """(first, last) program (local to the weight) contributing to column block j."""
  return _q_of(j * w.nkb, w.P, w.T), _q_of((j + 1) * w.nkb - 1, w.P, w.T)


def _w_tile(w: WeightPlan, w_ref, it, **load_kw):
  """(tile [bk, bn] / [bn, bk] as stored, column mask or None, K mask or None) of stream-K iteration it."""
  j = it // w.nkb
  k0 = (it - j * w.nkb) * w.bk
  n0 = j * w.bn
  kmask = ((k0 + jnp.arange(w.bk)) < w.K) if w.K % w.bk else None
  nmask = ((n0 + jnp.arange(w.bn)) < w.N) if w.N % w.bn else None
  if w.trans:
    wm = _and(None if nmask is None else nmask[:, None], None if kmask is None else kmask[None, :])
    ws = w_ref.at[pl.ds(n0, w.bn), pl.ds(k0, w.bk)]
  else:
    wm = _and(None if kmask is None else kmask[:, None], None if nmask is None else nmask[None, :])
    ws = w_ref.at[pl.ds(k0, w.bk), pl.ds(n0, w.bn)]
  if wm is None and not load_kw:
    return ws[...], nmask, kmask
  return C.pltriton.load(ws, mask=wm, other=None if wm is None else 0, **load_kw), nmask, kmask


def _prefetch(w: WeightPlan, w_ref, lo, hi, tiles: int, sink):
  """Bring this program's first `tiles` weight tiles [lo, lo + tiles) into the L2 (evict_last) while it
  would otherwise only wait: each tile is loaded and folded into a max that `sink` consumes (a load whose
  value is unused would be removed)."""
  if not tiles:
    return
  acc = None
  for i in range(tiles):
    t, _, _ = _w_tile(w, w_ref, jnp.minimum(lo + i, hi - 1), eviction_policy="evict_last")
    m = jnp.max(t.astype(jnp.float32))
    acc = m if acc is None else jnp.maximum(acc, m)
  sink(acc)


def _proj(w: WeightPlan, pid, *, R: int, x_tile, w_ref, part_ref, cnt: _Sync, rmask, dequant: str, precision,
          finish=None, counter=None, expected=None, last=None, wait=None, prefetch: int = 0, sink=None,
          on_wait=None, on_done=None):
  """One weight of a projection phase for program `pid` (a no-op outside [w.p0, w.p0 + w.P)).

  wait(): run before the first x tile is read (the phase's dependency), after `prefetch` tiles of the
  weight were brought into the L2. x_tile() (called once the wait is over: it may read what the wait
  guards) -> tile(k0, kmask) -> [R, bk] in the compute dtype (rows >= M zero).
  Where this program's range ends a column block j: with `finish` given and the block entirely its own,
  finish(j, acc [R, bn] float32) from registers; otherwise the partial goes to part_ref[slot] and the
  program counts itself in on counter(j); the one that brings it to expected(j) runs last(j), which sums
  the slots. on_wait(v) / on_done(acc): called with the wait's last counter value / the loop's final
  accumulator (the tracer's time stamps, which must depend on what they time)."""
  nkb, T, Pw = w.nkb, w.T, w.P
  q = pid - w.p0

  @pl.when((q >= 0) & (q < Pw))
  def _():
    lo = q * T // Pw
    hi = (q + 1) * T // Pw
    if wait is not None:
      _prefetch(w, w_ref, lo, hi, prefetch, sink)
      v = wait()
      if on_wait is not None:
        on_wait(v)
    tile = x_tile()

    def body(it, acc):
      j = it // nkb
      kb = it - j * nkb
      k0 = kb * w.bk
      n0 = j * w.bn
      wb, nmask, kmask = _w_tile(w, w_ref, it)
      xb = tile(k0, kmask)
      wb = dequant_int8(wb, xb.dtype, dequant) if wb.dtype == jnp.int8 else wb.astype(xb.dtype)
      acc = acc + C.dot(xb, wb, trans_b=w.trans, precision=precision)
      end = (kb == nkb - 1) | (it == hi - 1)

      @pl.when(end)
      def _():
        qf, ql = _span(w, j)

        def shared():
          om = rmask if nmask is None else rmask & nmask[None, :]
          dst = part_ref.at[q - qf, pl.ds(pid * 0, R), pl.ds(n0, w.bn)]
          C.store(dst, acc, mask=jnp.broadcast_to(om, acc.shape))
          old = cnt.arrive(counter(j))
          pl.when(old == expected(j) - 1)(lambda: last(j))

        if finish is None:
          shared()
        else:
          pl.when(qf == ql)(lambda: finish(j, acc))      # the whole column block is this program's
          pl.when(qf != ql)(shared)

      return jnp.where(end, 0.0, acc)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((R, w.bn), jnp.float32))
    if on_done is not None:
      on_done(acc)


def _slot_sum(w: WeightPlan, part_ref, j, rmask, zero):
  """[R, bn] float32: column block j's partials summed in slot order (deterministic); R from rmask [R, 1]."""
  qf, ql = _span(w, j)
  n0 = j * w.bn
  om = rmask if w.N % w.bn == 0 else rmask & ((n0 + jnp.arange(w.bn)) < w.N)[None, :]
  R = rmask.shape[0]
  tot = jnp.zeros((R, w.bn), jnp.float32)
  for s in range(w.slots):
    src = part_ref.at[zero + s, pl.ds(zero, R), pl.ds(n0, w.bn)]
    tot = tot + C.load(src, mask=jnp.broadcast_to(om & (s <= ql - qf), (R, w.bn)), other=0.0)
  return tot


def _row_stats(y, cmask):
  """Per-row sum and sum of squares of y [R, bn] float32 over the valid columns -> two [R]."""
  yf = y if cmask is None else jnp.where(cmask[None, :], y, 0.0)
  return jnp.sum(yf, axis=1), jnp.sum(yf * yf, axis=1)


class _Refs:
  """Named views of the kernel's refs (see `_decode_layer` for the order); absent ones are None."""

  def __init__(self, refs, names):
    assert len(refs) == len(names), (len(refs), names)
    self.__dict__.update(zip(names, refs))

  def __getattr__(self, name):      # only called for names not set: optional inputs left out
    return None


# ----------------------------------------------------------------------------------------------- kernel
def _layer_kernel(*refs, plan: LayerPlan, names, norm: str, eps: float, act: str, rotary: bool, phases,
                  reset: bool, interpret: bool, dequant: str, qk_scale: float, prefetch: int,
                  spin_sleep_ns: int, trace: bool):
  R = _Refs(refs, names)
  pl_ = plan
  M, D, kvh, h = pl_.M, pl_.D, pl_.kvh, pl_.h
  pid = pl.program_id(0)
  zero = pid * 0
  cnt = _Sync(R.cnt, zero, interpret, spin_sleep_ns)
  cdtype = R.x.dtype
  f32 = jnp.float32
  precision = C.dot_precision(cdtype)
  RT = pl_.R                                                               # the tiles' rows
  rmask = (jnp.arange(RT) < M)[:, None]                                    # [RT, 1]

  def vec(ref, start, width, mask):                                       # [1, width] float32 of a [N] ref
    v = ref.at[pl.ds(start, width)]
    return (v[...] if mask is None else C.load(v, mask=mask, other=0)).astype(f32)[None, :]

  def rows_view(ref, start, width, head=None):
    """[RT, width] view of an [M, N] ref at columns [start, start + width), or of an [M, heads, h] ref
    at head `head`, features [start, start + width)."""
    if head is None:
      return ref.at[pl.ds(zero, RT), pl.ds(start, width)]
    return ref.at[pl.ds(zero, RT), head, pl.ds(start, width)]

  def rows(ref, start, width, mask, head=None):
    m = rmask if mask is None else rmask & mask[None, :]
    return C.load(rows_view(ref, start, width, head), mask=jnp.broadcast_to(m, (RT, width)), other=0)

  def store_rows(ref, start, width, mask, val, head=None):
    m = rmask if mask is None else rmask & mask[None, :]
    C.store(rows_view(ref, start, width, head), val.astype(ref.dtype), mask=jnp.broadcast_to(m, (RT, width)))

  def load_stats(ref, nchunks):                                           # -> mean [RT, 1] or None, rstd
    cp = max(16, pl.next_power_of_2(nchunks))
    sm = jnp.broadcast_to(rmask & (jnp.arange(cp) < nchunks)[None, :], (RT, cp))
    s1 = jnp.sum(C.load(ref.at[zero, pl.ds(zero, RT), pl.ds(zero, cp)], mask=sm, other=0), axis=1)
    s2 = jnp.sum(C.load(ref.at[zero + 1, pl.ds(zero, RT), pl.ds(zero, cp)], mask=sm, other=0), axis=1)
    mean, rstd = mean_rstd(s1 if norm == "layernorm" else None, s2, D, norm, eps)
    return (None if mean is None else mean[:, None]), rstd[:, None]

  def normed_tile(x_ref, stats, g_ref, b_ref, bk):
    mean, rstd = stats

    def tile(k0, kmask):
      xb = rows(x_ref, k0, bk, kmask).astype(f32)
      y = scale_shift(xb, mean, rstd, vec(g_ref, k0, bk, kmask), None if b_ref is None else vec(b_ref, k0, bk, kmask))
      return y.astype(cdtype)
    return tile

  def epilogue_sum(w: WeightPlan, j, acc, scale_ref, bias_ref):
    """acc * scale + bias of column block j: ([RT, bn] float32, n0, column mask or None)."""
    n0 = j * w.bn
    nmask = ((n0 + jnp.arange(w.bn)) < w.N) if w.N % w.bn else None
    y = acc
    if scale_ref is not None:
      y = y * vec(scale_ref, n0, w.bn, nmask)
    if bias_ref is not None:
      y = y + vec(bias_ref, n0, w.bn, nmask)
    return y, n0, nmask

  def residual_out(w: WeightPlan, j, acc, scale_ref, bias_ref, res_ref, out_ref, stats_ref):
    """Column block j of a projection that ends a sub-block: acc * scale + bias + the residual, rounded to
    the dtype, into out_ref; its per-row sum and sum of squares into stats_ref[:, :, j] (the next norm's)."""
    y, n0, nmask = epilogue_sum(w, j, acc, scale_ref, bias_ref)
    yr = (y + rows(res_ref, n0, w.bn, nmask).astype(f32)).astype(cdtype)
    store_rows(out_ref, n0, w.bn, nmask, yr)
    s1, s2 = _row_stats(yr.astype(f32), nmask)
    C.store(stats_ref.at[zero, pl.ds(zero, RT), pl.ds(j, 1)], s1[:, None], mask=rmask)
    C.store(stats_ref.at[zero + 1, pl.ds(zero, RT), pl.ds(j, 1)], s2[:, None], mask=rmask)

  def stamp(event, dep=None):
    """trace: this program's time (%globaltimer_lo, ns) at `event` into trace[pid, event]; dep: a value the
    stamp must follow (the clock read is a pure asm: without a dependency it could be hoisted)."""
    if not trace:
      return
    d = zero
    if dep is not None:
      dep = jnp.sum(dep) if getattr(dep, "ndim", 0) else dep
      d = jnp.where(dep == dep, zero, zero + 1) if jnp.issubdtype(dep.dtype, jnp.floating) else \
          jnp.where(dep == -7777777, zero + 1, zero)
    arg = jnp.zeros((1,), jnp.int32) + d + event
    if interpret:
      t = arg
    else:
      [t] = C.pltriton.elementwise_inline_asm("mov.u32 $0, %globaltimer_lo;", args=[arg], constraints="=r,r",
                                               pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
    C.store(R.trace.at[pl.ds(pid, 1), pl.ds(zero + event, 1)], jnp.reshape(t, (1, 1)))

  if trace and "norm1" in phases:     # the first (or only) launch of the layer clears this program's row
    C.store(R.trace.at[pl.ds(pid, 1), pl.ds(zero, TRACE_EVENTS)], jnp.zeros((1, TRACE_EVENTS), jnp.int32))
    stamp(EV["start"])

  def sink(v):               # consumes prefetched values: a store that never happens, not provably so
    pl.when(v == -1.2345e38)(lambda: C.store(R.sink.at[pl.ds(zero, 1)], jnp.reshape(v, (1,))))

  def proj(w, x_tile, w_ref, part_ref, finish, wait=None, ev=None):
    """The usual column-block protocol: finish from registers or the last arriver sums the slots. ev: the
    phase's name in EV (its "_wait" and "_done" time stamps)."""
    _proj(w, pid, R=RT, x_tile=x_tile, w_ref=w_ref, part_ref=part_ref, cnt=cnt, rmask=rmask, dequant=dequant,
          precision=precision, finish=finish, counter=lambda j: w.cnt0 + j,
          expected=lambda j: (lambda s: s[1] - s[0] + 1)(_span(w, j)),
          last=lambda j: finish(j, _slot_sum(w, part_ref, j, rmask, zero)), wait=wait, prefetch=prefetch,
          sink=sink, on_wait=ev and (lambda v: stamp(EV[ev + "_wait"], v)),
          on_done=ev and (lambda a: stamp(EV[ev + "_done"], a)))

  # ------------------------------------------------------------------------------------------ qkv
  def norm_phase(x_ref, stats_ref, nchunks, g_ref, b_ref, out_ref, done):
    """prenorm: this program's NORM_CHUNK-column chunks of norm(x) into out_ref, each counted on `done`."""
    def chunk(t, carry):
      c0 = (pid + t * pl_.P) * NORM_CHUNK
      cm = ((c0 + jnp.arange(NORM_CHUNK)) < D) if D % NORM_CHUNK else None
      y = normed_tile(x_ref, load_stats(stats_ref, nchunks), g_ref, b_ref, NORM_CHUNK)(c0, cm)
      store_rows(out_ref, c0, NORM_CHUNK, cm, y)
      cnt.arrive(done)
      return carry
    jax.lax.fori_loop(0, jnp.maximum(pl_.norm_chunks - pid + pl_.P - 1, 0) // pl_.P, chunk, 0)

  def plain_tile(ref, bk):
    return lambda: lambda k0, km: rows(ref, k0, bk, km).astype(cdtype)

  # ---------------------------------------------------------------------------------------- norm1
  if "norm1" in phases and pl_.prenorm:
    norm_phase(R.x, R.stats, R.stats.shape[2], R.ln1_g, R.ln1_b, R.h1, pl_.n1_done)

  # ------------------------------------------------------------------------------------------ qkv
  if "qkv" in phases:
    wait_n1 = (lambda: cnt.wait(pl_.n1_done, pl_.norm_chunks)) if pl_.prenorm and "norm1" in phases else None
    for w, nm in zip(pl_.qkv, ("q", "k", "v")):
      def finish(j, acc, w=w, nm=nm):
        y, n0, _ = epilogue_sum(w, j, acc, getattr(R, f"s{nm}"), getattr(R, f"b{nm}"))
        store_rows(getattr(R, f"{nm}_buf"), n0 % h, w.bn, None, y, head=n0 // h)   # [M, heads, h] buffers
        cnt.arrive(pl_.qkv_done)
      if pl_.prenorm:
        x_tile = plain_tile(R.h1, w.bk)
      else:
        x_tile = lambda w=w: normed_tile(R.x, load_stats(R.stats, R.stats.shape[2]), R.ln1_g, R.ln1_b, w.bk)  # noqa: E731
      proj(w, x_tile, getattr(R, f"w{nm}"), getattr(R, f"p{nm}"), finish, wait=wait_n1, ev="qkv")

  # ----------------------------------------------------------------------------------------- attn
  if "attn" in phases:
    _attention(R, pl_, pid, zero, cnt, cdtype, precision, qk_scale, rotary, sink if prefetch else None,
               stamp if trace else None)

  # -------------------------------------------------------------------------------------------- o
  if "o" in phases:
    w = pl_.o

    def finish_o(j, acc):
      residual_out(w, j, acc, R.so, R.bo, R.x, R.x_mid, R.mid_stats)
      cnt.arrive(pl_.o_done)

    # x tiles: a K block stays inside one head of the [M, n, h] attention output (block_k <= h)
    proj(w, lambda: lambda k0, km: rows(R.attn, k0 % h, w.bk, None, head=k0 // h).astype(cdtype), R.wo, R.po,
         finish_o, wait=(lambda: cnt.wait(pl_.att_done, M * kvh)) if "attn" in phases else None, ev="o")

  # ------------------------------------------------------------------------------------------ fc1
  if "norm2" in phases and pl_.prenorm:
    if "o" in phases:
      cnt.wait(pl_.o_done, pl_.o.nb)
    norm_phase(R.x_mid, R.mid_stats, pl_.o.nb, R.ln2_g, R.ln2_b, R.h2, pl_.n2_done)

  if "fc1" in phases:
    w1 = pl_.fc1[0]
    if pl_.prenorm:
      wait1 = (lambda: cnt.wait(pl_.n2_done, pl_.norm_chunks)) if "norm2" in phases else None
    else:
      wait1 = (lambda: cnt.wait(pl_.o_done, pl_.o.nb)) if "o" in phases else None

    def x_mid_tile(bk):           # norm(x_mid) tiles; its statistics read once the wait is over
      if pl_.prenorm:
        return plain_tile(R.h2, bk)
      return lambda: normed_tile(R.x_mid, load_stats(R.mid_stats, pl_.o.nb), R.ln2_g, R.ln2_b, bk)

    def finish_1(j, up, gate=None):
      y, n0, nmask = epilogue_sum(w1, j, up, R.s1, R.b1)
      y = y.astype(cdtype).astype(f32)
      if gate is None:
        y = kernel_activation(act, y)
      else:
        yg, _, _ = epilogue_sum(pl_.fc1[1], j, gate, R.sg, R.bg)
        y = kernel_activation(act, yg.astype(cdtype).astype(f32)) * y
      store_rows(R.h_buf, n0, w1.bn, nmask, y)
      cnt.arrive(pl_.f1_done)

    if not pl_.gated:
      proj(w1, x_mid_tile(w1.bk), R.w1, R.p1, finish_1, wait=wait1, ev="fc1")
    else:
      # up (w1) and gate (wg) stream on their own programs; a column block is finished by whichever of its
      # contributors (of either weight) arrives last, from both weights' partials
      wg = pl_.fc1[1]

      def expected(j):
        (a0, a1), (b0, b1) = _span(w1, j), _span(wg, j)
        return (a1 - a0 + 1) + (b1 - b0 + 1)

      def last(j):
        finish_1(j, _slot_sum(w1, R.p1, j, rmask, zero), _slot_sum(wg, R.pg, j, rmask, zero))

      for w, w_ref, p_ref in ((w1, R.w1, R.p1), (wg, R.wg, R.pg)):
        _proj(w, pid, R=RT, x_tile=x_mid_tile(w.bk), w_ref=w_ref, part_ref=p_ref, cnt=cnt, rmask=rmask,
              dequant=dequant, precision=precision, counter=lambda j: w1.cnt0 + j, expected=expected, last=last,
              wait=wait1, prefetch=prefetch, sink=sink, on_wait=lambda v: stamp(EV["fc1_wait"], v),
              on_done=lambda a: stamp(EV["fc1_done"], a))

  # ------------------------------------------------------------------------------------------ fc2
  if "fc2" in phases:
    w = pl_.fc2

    def finish_2(j, acc):
      residual_out(w, j, acc, R.s2, R.b2, R.x_mid, R.x_out, R.out_stats)

    proj(w, plain_tile(R.h_buf, w.bk), R.w2, R.p2, finish_2,
         wait=(lambda: cnt.wait(pl_.f1_done, pl_.fc1[0].nb)) if "fc1" in phases else None, ev="fc2")

  # ----------------------------------------------------------------------------------------- exit
  old = cnt.arrive(pl_.exit)
  stamp(EV["exit"], old)
  if prefetch and R.nwq is not None:
    # The first half of the programs out bring their first tiles of the NEXT layer's q/k/v (the same plan:
    # the same tiles for the same program) into the L2 while the last ones finish: that launch's weight
    # stream then starts from the L2. (After its arrival a program touches no counter.)
    @pl.when(old < pl_.P // 2)
    def _():
      for w, ref in zip(pl_.qkv, (R.nwq, R.nwk, R.nwv)):
        q = pid - w.p0

        @pl.when((q >= 0) & (q < w.P))
        def _(w=w, ref=ref, q=q):
          _prefetch(w, ref, q * w.T // w.P, (q + 1) * w.T // w.P, prefetch, sink)

  @pl.when(old == pl_.P - 1)      # the last program out: every other one is past its last counter access
  def _():
    if reset:
      width = max(16, pl.next_power_of_2(pl_.n_counters))
      C.store(R.cnt.at[pl.ds(zero, width)], jnp.zeros((width,), jnp.int32),
              mask=jnp.arange(width) < pl_.n_counters)
    else:
      C.store(R.cnt.at[pl.ds(zero + pl_.exit, 1)], jnp.zeros((1,), jnp.int32))


def _attention(R, pl_: LayerPlan, pid, zero, cnt: _Sync, cdtype, precision, qk_scale: float, rotary: bool,
               sink=None, stamp=None):
  """The attention phase: units (row b, kv head, key split c) dealt round-robin to the programs. A unit
  waits for q/k/v, rotates q and the new key (rotary models), writes the new K/V into the cache (the split
  holding the row's last key), attends over its split of keys [0, pos] (the new key from registers) and
  either writes the output or, with several splits, its partial (o, m, l); the last split of a (row, kv
  head) in merges them in split order."""
  M, n, kvh, h = pl_.M, pl_.n, pl_.kvh, pl_.h
  g = n // kvh
  f32 = jnp.float32
  Cs, BA = pl_.att_splits, pl_.att_block
  U = M * kvh * Cs
  total_qkv = sum(w.nb for w in pl_.qkv)
  gp = max(16, pl.next_power_of_2(g))
  nr = 1 if g == 1 else gp                                   # query rows a unit holds
  half = h // 2
  parts = ((0, half), (half, half)) if rotary else ((0, h),)   # q/k feature ranges (rotary: the two halves)

  def coords(u):
    """(row, kv head, split, position, length, its key blocks [lo, hi), blocks per split, blocks) of unit u."""
    b = u // (kvh * Cs)
    r = u - b * (kvh * Cs)
    kh = r // Cs
    c = r - kh * Cs
    pos = jnp.minimum(R.positions[b], pl_.s_cap - 1)
    length = pos + 1
    nblk = (length + BA - 1) // BA
    per = (nblk + Cs - 1) // Cs
    lo = c * per
    return b, kh, c, pos, length, lo, jnp.minimum(lo + per, nblk), per, nblk

  @pl.when(pid < U)
  def _():
    if sink is not None:   # the first unit's first K/V block (the past: it does not wait for q/k/v) into the L2
      b, kh, _, _, length, lo, _, _, nblk = coords(pid)
      st0 = jnp.minimum(lo, nblk - 1) * BA
      rr0 = (st0 + jnp.arange(BA)) < length
      mx = None
      for ref in (R.k_out, R.v_out):
        blk = C.pltriton.load(ref.at[b, kh, pl.ds(st0, BA), :], mask=rr0[:, None], other=0,
                              eviction_policy="evict_last")
        m_ = jnp.max(blk.astype(f32))
        mx = m_ if mx is None else jnp.maximum(mx, m_)
      sink(mx)
    v = cnt.wait(pl_.qkv_done, total_qkv)
    if stamp is not None:
      stamp(EV["attn_wait"], v)

    def unit(t, carry):     # this program's units: pid, pid + P, ...
      b, kh, c, pos, length, lo, hi, per, nblk = coords(pid + t * pl_.P)

      def head_vec(ref, c0, w):                                # [1, w] of an [M, heads, h] ref, kv head kh
        return C.load(ref.at[pl.ds(b, 1), kh, pl.ds(c0, w)]).astype(f32)

      if g == 1:
        def q_part(c0, w):
          return head_vec(R.q_buf, c0, w)
      else:
        qmask = jnp.broadcast_to((jnp.arange(gp) < g)[:, None], (gp, half if rotary else h))

        def q_part(c0, w):                                     # [gp, w]: the g query heads of kv head kh
          return C.load(R.q_buf.at[b, pl.ds(kh * g, gp), pl.ds(c0, w)], mask=qmask, other=0).astype(f32)

      qs = [q_part(c0, w) for c0, w in parts]
      ks = [head_vec(R.k_buf, c0, w) for c0, w in parts]
      v_new = head_vec(R.v_buf, 0, h)
      if rotary:   # NeoX / LLaMA halves: (a, b) -> (a cos - b sin, b cos + a sin), rounded as XLA's path rounds
        ang = pos.astype(f32) * R.rope[...].astype(f32)[None, :]           # [1, h/2]
        cos, sin = jnp.cos(ang), jnp.sin(ang)

        def rot(a, b_):
          return ((a * cos - b_ * sin).astype(cdtype).astype(f32), (b_ * cos + a * sin).astype(cdtype).astype(f32))
        qs = list(rot(*qs))
        ks = list(rot(*ks))
      writer = c == (nblk - 1) // per

      @pl.when(writer)
      def _():
        for (c0, w), kp in zip(parts, ks):
          C.store(R.k_out.at[b, kh, pl.ds(pos, 1), pl.ds(c0, w)], kp.astype(R.k_out.dtype))
        C.store(R.v_out.at[b, kh, pl.ds(pos, 1), :], v_new.astype(R.v_out.dtype))

      def kv_block(ref, new, start, c0, w):
        rr = start + jnp.arange(BA)
        blk = C.load(ref.at[b, kh, pl.ds(start, BA), pl.ds(c0, w)], mask=(rr < length)[:, None], other=0.0)
        return rr, jnp.where((rr == pos)[:, None], new, blk.astype(f32))   # the new token from registers

      if g == 1:
        qv = [qp * qk_scale for qp in qs]

        def body(i, carry):
          o, m, l = carry
          s = None
          for (c0, w), qp, kp in zip(parts, qv, ks):
            rr, kb = kv_block(R.k_out, kp, i * BA, c0, w)
            sp = jnp.sum(kb * qp, axis=1)                      # [BA]
            s = sp if s is None else s + sp
          s = jnp.where(rr < length, s, C.MASK_VALUE)
          m_new = jnp.maximum(m, jnp.max(s))
          alpha = jnp.exp2(m - m_new)
          p = jnp.exp2(s - m_new)
          _, vb = kv_block(R.v_out, v_new, i * BA, 0, h)
          return o * alpha + jnp.sum(p[:, None] * vb, axis=0, keepdims=True), m_new, l * alpha + jnp.sum(p)

        init = (jnp.zeros((1, h), f32), jnp.float32(C.MASK_VALUE), jnp.float32(0.0))
      else:
        qd = [qp.astype(cdtype) for qp in qs]

        def body(i, carry):
          o, m, l = carry
          s = None
          for (c0, w), qp, kp in zip(parts, qd, ks):
            rr, kb = kv_block(R.k_out, kp, i * BA, c0, w)
            sp = C.dot(qp, kb.astype(cdtype), trans_b=True, precision=precision)   # [gp, BA]
            s = sp if s is None else s + sp
          s = jnp.where((rr < length)[None, :], s * qk_scale, C.MASK_VALUE)
          m_new = jnp.maximum(m, jnp.max(s, axis=1))
          alpha = jnp.exp2(m - m_new)
          p = jnp.exp2(s - m_new[:, None])
          _, vb = kv_block(R.v_out, v_new, i * BA, 0, h)
          o = o * alpha[:, None] + C.dot(p.astype(cdtype), vb.astype(cdtype), precision=precision)
          return o, m_new, l * alpha + jnp.sum(p, axis=1)

        init = (jnp.zeros((gp, h), f32), jnp.full((gp,), C.MASK_VALUE, f32), jnp.zeros((gp,), f32))
      o, m, l = jax.lax.fori_loop(lo, hi, body, init)
      grp = b * kvh + kh

      def put_out(o_fin):                                      # [nr, h] float32 -> the [M, n, h] output
        if g == 1:
          C.store(R.attn.at[pl.ds(b, 1), kh, :], o_fin.astype(R.attn.dtype))
        else:
          C.store(R.attn.at[b, pl.ds(kh * g, gp), :], o_fin.astype(R.attn.dtype),
                  mask=jnp.broadcast_to((jnp.arange(gp) < g)[:, None], (gp, h)))
        cnt.arrive(pl_.att_done)

      if Cs == 1:
        put_out(o / jnp.reshape(jnp.maximum(l, 1e-30), (nr, 1)))
      else:
        # partials: att_o [G, Cs * nr, h], att_m / att_l [G, Cs * nr, 1]
        C.store(R.att_o.at[grp, pl.ds(c * nr, nr), :], o)
        C.store(R.att_m.at[grp, pl.ds(c * nr, nr), :], jnp.reshape(m, (nr, 1)))
        C.store(R.att_l.at[grp, pl.ds(c * nr, nr), :], jnp.reshape(l, (nr, 1)))
        old = cnt.arrive(pl_.att_grp + grp)

        @pl.when(old == Cs - 1)        # the last split in merges them (in split order)
        def _():
          ms = [C.load(R.att_m.at[grp, pl.ds(zero + s * nr, nr), :]) for s in range(Cs)]   # [nr, 1]
          mx = ms[0]
          for s in range(1, Cs):
            mx = jnp.maximum(mx, ms[s])
          tot_l = jnp.zeros_like(mx)
          tot_o = jnp.zeros((nr, h), f32)
          for s in range(Cs):
            wgt = jnp.exp2(ms[s] - mx)                         # an empty split: weight 0
            tot_l = tot_l + C.load(R.att_l.at[grp, pl.ds(zero + s * nr, nr), :]) * wgt
            tot_o = tot_o + C.load(R.att_o.at[grp, pl.ds(zero + s * nr, nr), :]) * wgt
          put_out(tot_o / jnp.maximum(tot_l, 1e-30))
      return carry + jnp.sum(o) if stamp is not None else carry    # traced: a value the stamp follows

    done = jax.lax.fori_loop(0, (U - pid + pl_.P - 1) // pl_.P, unit, jnp.float32(0))
    if stamp is not None:
      stamp(EV["attn_done"], done)


# ---------------------------------------------------------------------------------------------- calls
WEIGHTS = ("q", "k", "v", "o", "1", "2", "g")    # wq wk wv wo w1 (up) w2 (down) wg (gate), scales s*, biases b*


class LayerParams(NamedTuple):
  """One layer's parameters as the kernel takes them. w*: [K, N] float or int8 ([N, K] where the matching
  `trans` flag is set: int8 stored transposed); s*: [N] scales (int8) or None; b*: [N] biases or None;
  ln*_g / ln*_b: the norms' scale and (LayerNorm) bias, [D]; wg / sg / bg: the gate of a gated MLP
  (act(x wg) * (x w1)) or None; rope: rotary inverse frequencies [h/2] float32 (rotary models) or None."""
  ln1_g: Any
  ln1_b: Any
  wq: Any
  sq: Any
  bq: Any
  wk: Any
  sk: Any
  bk: Any
  wv: Any
  sv: Any
  bv: Any
  wo: Any
  so: Any
  bo: Any
  ln2_g: Any
  ln2_b: Any
  w1: Any
  s1: Any
  b1: Any
  w2: Any
  s2: Any
  b2: Any
  wg: Any = None
  sg: Any = None
  bg: Any = None
  rope: Any = None


def _kn(w, t):
  return (w.shape[1], w.shape[0]) if t else tuple(w.shape)


def _trans(p: LayerParams, trans) -> tuple:
  """The 7 per-weight layout flags (wq wk wv wo w1 w2 wg) from 6 or 7 given."""
  trans = tuple(bool(t) for t in trans)
  assert len(trans) in (6, 7), f"trans must hold a flag per weight (wq wk wv wo w1 w2 [wg]), got {trans!r}"
  return trans + (trans[4],) if len(trans) == 6 else trans


def layer_plan(x, k_cache, p: LayerParams, trans, config: LayerConfig, interpret: bool) -> LayerPlan:
  M, D = x.shape
  _, kvh, s_cap, h = k_cache.shape
  trans = _trans(p, trans)
  n = _kn(p.wq, trans[0])[1] // h
  F = _kn(p.w1, trans[4])[1]
  ws = (p.wq, p.wk, p.wv, p.wo, p.w1, p.w2, p.wg if p.wg is not None else p.w1)
  return make_plan(default_programs(config, interpret), M, D, n, kvh, h, F, s_cap,
                   tuple(jnp.dtype(w.dtype).itemsize for w in ws), trans, config, gated=p.wg is not None)


def _check(x, stats, positions, k_cache, v_cache, p: LayerParams, trans, norm, act):
  assert x.ndim == 2, f"x must be [M, D], got {x.shape}"
  M, D = x.shape
  assert 1 <= M <= MAX_ROWS, f"decode_layer takes 1..{MAX_ROWS} rows, got M={M} (x.shape={x.shape})"
  C.check_dtype("x", x)
  assert stats.ndim == 3 and stats.shape[:2] == (2, M), f"stats must be [2, M={M}, C], got {stats.shape}"
  assert k_cache.ndim == 4 and k_cache.shape == v_cache.shape and k_cache.shape[0] == M, (
      f"k_cache / v_cache must be [M={M}, k, s, h], got {k_cache.shape} / {v_cache.shape}")
  assert k_cache.dtype == v_cache.dtype == x.dtype, (
      f"the caches ({k_cache.dtype}, {v_cache.dtype}) must have x's dtype {x.dtype}")
  _, kvh, s_cap, h = k_cache.shape
  assert 16 <= h <= 256 and h & (h - 1) == 0, f"head_dim={h} must be a power of two in 16..256"
  assert positions.shape == (M,), f"positions must be [M]=[{M}], got {positions.shape}"
  assert norm in NORMS, f"norm={norm!r} is not one of {NORMS}"
  assert act in ACTIVATIONS, f"act={act!r} is not one of {ACTIVATIONS}"
  gated = p.wg is not None
  qn = _kn(p.wq, trans[0])[1]
  assert qn % h == 0 and (qn // h) % kvh == 0, f"wq's {qn} outputs are not heads of {h} over {kvh} kv heads"
  n = qn // h
  F = _kn(p.w1, trans[4])[1]
  want = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
  for name, kn, t in zip(WEIGHTS, want, trans):
    w = getattr(p, f"w{name}")
    assert w.ndim == 2 and _kn(w, t) == kn, (
        f"w{name}.shape={w.shape}{' (transposed)' if t else ''}: expected [K, N]={list(kn)}")
    assert jnp.dtype(w.dtype) in C.SUPPORTED_DTYPES + (jnp.dtype(jnp.int8),), f"w{name}.dtype={w.dtype}"
    assert not t or w.dtype == jnp.int8, f"w{name}: only int8 weights are taken transposed"
    for kind in ("s", "b"):
      v = getattr(p, f"{kind}{name}")
      assert v is None or v.shape == (kn[1],), f"{kind}{name} must be [{kn[1]}], got {v.shape}"
    assert (w.dtype == jnp.int8) == (getattr(p, f"s{name}") is not None), f"s{name}: int8 weights need scales"
  if not gated:
    assert p.sg is None and p.bg is None, "sg / bg given without wg"
  for name in ("ln1_g", "ln2_g", "ln1_b", "ln2_b"):
    v = getattr(p, name)
    assert (v is None) == (name.endswith("_b") and norm == "rmsnorm"), (
        f"{name}: {'LayerNorm needs it' if v is None else 'RMSNorm has none'}")
    assert v is None or v.shape == (D,), f"{name} must be [D]=[{D}], got {v.shape}"
  assert p.rope is None or p.rope.shape == (h // 2,), f"rope must be [h/2]=[{h // 2}], got {p.rope.shape}"


def _scratch(plan: LayerPlan, dtype):
  """(name, shape, dtype) of the kernel's outputs after the caches and counters: the intermediate buffers
  (q/k/v and the attention output per head, partial slots, x_mid and its statistics, h)."""
  M, D, n, kvh, h, F = plan.M, plan.D, plan.n, plan.kvh, plan.h, plan.F
  g = n // kvh
  nr = 1 if g == 1 else max(16, pl.next_power_of_2(g))
  f32 = jnp.float32
  wq, wk, wv = plan.qkv
  out = [
      ("q_buf", (M, n, h), dtype), ("k_buf", (M, kvh, h), dtype), ("v_buf", (M, kvh, h), dtype),
      ("pq", (wq.slots, M, n * h), f32), ("pk", (wk.slots, M, kvh * h), f32), ("pv", (wv.slots, M, kvh * h), f32),
      ("att_o", (M * kvh, plan.att_splits * nr, h), f32), ("att_m", (M * kvh, plan.att_splits * nr, 1), f32),
      ("att_l", (M * kvh, plan.att_splits * nr, 1), f32),
      ("attn", (M, n, h), dtype),
      ("po", (plan.o.slots, M, D), f32), ("x_mid", (M, D), dtype), ("mid_stats", (2, M, plan.o.nb), f32),
      ("p1", (plan.fc1[0].slots, M, F), f32), ("h_buf", (M, F), dtype),
      ("p2", (plan.fc2.slots, M, D), f32),
  ]
  if plan.gated:
    out.append(("pg", (plan.fc1[1].slots, M, F), f32))
  if plan.prenorm:
    out += [("h1", (M, D), dtype), ("h2", (M, D), dtype)]
  out.append(("sink", (16,), f32))
  return out


N_HEAD_OUTS = 5     # x_out, out_stats, k_out, v_out, cnt: then the scratch buffers


@functools.partial(jax.jit, static_argnames=("trans", "norm", "eps", "act", "scale", "config", "interpret",
                                             "phased", "trace"))
def _decode_layer(x, stats, positions, k_cache, v_cache, counters, p: LayerParams, next_qkv, *, trans, norm, eps,
                  act, scale, config, interpret, phased, trace=False):
  M, D = x.shape
  plan = layer_plan(x, k_cache, p, trans, config, interpret)
  assert counters.shape == (plan.n_counters,) and counters.dtype == jnp.int32, (
      f"counters must be int32 [{plan.n_counters}] (layer_counters), got {counters.dtype}{counters.shape}")
  qk_scale = (plan.h ** -0.5 if scale is None else float(scale)) * C.LOG2E
  ins = [x, stats, positions.astype(jnp.int32)]
  names = ["x", "stats", "positions"]
  for name, v in p._asdict().items():
    if v is not None:
      ins.append(v)
      names.append(name)
  if next_qkv is not None:
    ins += list(next_qkv)
    names += ["nwq", "nwk", "nwv"]
  ins += [k_cache, v_cache, counters]
  names += ["k_in", "v_in", "cnt_in"]
  outs = [("x_out", (M, D), x.dtype), ("out_stats", (2, M, plan.fc2.nb), jnp.float32),
          ("k_out", k_cache.shape, k_cache.dtype), ("v_out", v_cache.shape, v_cache.dtype),
          ("cnt", counters.shape, jnp.int32)] + _scratch(plan, x.dtype)
  if trace:
    outs.append(("trace", (plan.P, TRACE_EVENTS), jnp.int32))
  n_in = len(ins)
  aliases = {n_in - 3: 2, n_in - 2: 3, n_in - 1: 4}
  whole = lambda shape: pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))  # noqa: E731
  out_shape = [jax.ShapeDtypeStruct(sh, dt) for _, sh, dt in outs]
  out_names = [nm for nm, _, _ in outs]

  def call(phases, reset, args, extra_aliases):
    in_names = names + ([f"{o}_in" for o in out_names[N_HEAD_OUTS:]] if len(args) > n_in else [])
    kernel = functools.partial(
        _layer_kernel, plan=plan, names=tuple(in_names + out_names), norm=norm, eps=float(eps), act=act,
        rotary=p.rope is not None, phases=phases, reset=reset, interpret=interpret,
        dequant=resolve_dequant(config.dequant, interpret), qk_scale=qk_scale, prefetch=config.prefetch_tiles,
        spin_sleep_ns=config.spin_sleep_ns, trace=trace)
    return pl.pallas_call(
        kernel,
        grid=(plan.P,),
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole(o.shape) for o in out_shape],
        out_shape=out_shape,
        input_output_aliases={**aliases, **extra_aliases},
        compiler_params=C.triton_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="ftjax_decode_layer",
    )(*args)

  if not phased:
    res = call(PHASES, True, ins, {})
    return tuple(res[:N_HEAD_OUTS]) + ((res[-1],) if trace else ())
  # One launch per phase (interpret-mode tests of the multi-program split): the outputs travel from launch
  # to launch (inputs aliased to the outputs), so a phase reads what the previous ones wrote.
  state = [jnp.zeros(o.shape, o.dtype) for o in out_shape[:2]] + [k_cache, v_cache, counters] \
      + [jnp.zeros(o.shape, o.dtype) for o in out_shape[N_HEAD_OUTS:]]
  for i, ph in enumerate(PHASES):
    args = ins[:n_in - 3] + state[2:]
    extra = {n_in + j: N_HEAD_OUTS + j for j in range(len(state) - N_HEAD_OUTS)}
    r = list(call((ph,), i == len(PHASES) - 1, args, extra))
    state = (r[:2] if ph == "fc2" else state[:2]) + r[2:]
  return tuple(state[:N_HEAD_OUTS]) + ((state[-1],) if trace else ())


def layer_counters(x, k_cache, p: LayerParams, trans=(False,) * 6, *, config: LayerConfig | None = None,
                   interpret: bool = False):
  """The zeroed int32 counters a layer launch needs (one array serves every layer of a step in turn: each
  launch leaves it zeroed)."""
  plan = layer_plan(x, k_cache, p, tuple(trans), config or DEFAULT_CONFIG, interpret)
  return jnp.zeros((plan.n_counters,), jnp.int32)


def decode_layer(x, stats, positions, k_cache, v_cache, counters, p: LayerParams, *, trans=(False,) * 6,
                 norm: str = "layernorm", eps: float = 1e-5, act: str = "gelu_tanh", scale=None,
                 config: LayerConfig | None = None, interpret: bool = False, phased: bool = False,
                 next_qkv=None):
  """One decoder layer (sequential residual) of the decode step in one kernel launch (see the module doc).

  x [M, D], stats [2, M, C] (x's row sums / sums of squares over C chunks: `row_stats(x)` or the previous
  layer's), positions [M], k_cache / v_cache [M, k, s, h] (aliased to the outputs: updated in place where
  the caller's buffers are dead), counters from `layer_counters` (returned zeroed). trans: per weight of
  (wq, wk, wv, wo, w1, w2[, wg]), True where it is int8 stored [N, K] (wg follows w1 when not given).
  next_qkv: the next layer's (wq, wk, wv) (same shapes and layouts), whose first tiles programs that finish
  early bring into the L2 when config.prefetch_tiles > 0 (None: no such prefetch).
  scale: attention's scale (None: h^-0.5). phased: one launch per phase (the interpreter's way to run
  several programs; on a GPU a diagnostic that takes the waits between phases out of the picture).
  -> (x_out [M, D], stats_out [2, M, C'], k_cache, v_cache, counters)."""
  trans = _trans(p, trans)
  _check(x, stats, positions, k_cache, v_cache, p, trans, norm, act)
  config = config or DEFAULT_CONFIG
  assert isinstance(config, LayerConfig), f"config must be a LayerConfig, got {type(config).__name__}"
  if next_qkv is not None:
    next_qkv = tuple(next_qkv)
    assert len(next_qkv) == 3 and all(a.shape == b.shape and a.dtype == b.dtype
                                      for a, b in zip(next_qkv, (p.wq, p.wk, p.wv))), (
        "next_qkv must be the next layer's (wq, wk, wv), shaped as this layer's")
    if not config.prefetch_tiles:
      next_qkv = None
  return _decode_layer(x, stats, positions, k_cache, v_cache, counters, p, next_qkv, trans=trans, norm=norm,
                       eps=float(eps), act=act, scale=scale, config=config, interpret=bool(interpret),
                       phased=bool(phased))


def decode_layer_traced(x, stats, positions, k_cache, v_cache, counters, p: LayerParams, **kw):
  """`decode_layer` with time stamps: (its outputs, trace [P, TRACE_EVENTS] int32), trace[p, EV[name]] the
  %globaltimer_lo (ns) at which program p reached event `name` of EVENTS (0: it has no such event, e.g. no
  wait before a phase it has no work in). The stamps cost a few instructions each; for profiling
  (bench/layer_trace.py)."""
  trans = _trans(p, kw.pop("trans", (False,) * 6))
  norm, act = kw.get("norm", "layernorm"), kw.get("act", "gelu_tanh")
  _check(x, stats, positions, k_cache, v_cache, p, trans, norm, act)
  config = kw.pop("config", None) or DEFAULT_CONFIG
  out = _decode_layer(x, stats, positions, k_cache, v_cache, counters, p, None, trans=trans, norm=norm,
                      eps=float(kw.get("eps", 1e-5)), act=act, scale=kw.get("scale"), config=config,
                      interpret=bool(kw.get("interpret", False)), phased=bool(kw.get("phased", False)), trace=True)
  return out[:N_HEAD_OUTS], out[N_HEAD_OUTS]


def row_stats(x):
  """[2, M, 1] float32: each row's sum and sum of squares (the `stats` of a layer's first input)."""
  xf = x.astype(jnp.float32)
  return jnp.stack([jnp.sum(xf, -1), jnp.sum(xf * xf, -1)])[:, :, None]


def decode_layer_reference(x, stats, positions, k_cache, v_cache, p: LayerParams, *, trans=(False,) * 6,
                           norm: str = "layernorm", eps: float = 1e-5, act: str = "gelu_tanh", scale=None):
  """Plain-jnp float32 twin of `decode_layer` (same rounding points to the dtype; products in float32)
  -> (x_out, stats_out [2, M, 1], k_cache, v_cache)."""
  from ftjax.pallas.decode_attention import decode_attention_reference

  trans = _trans(p, trans)
  dt = x.dtype
  M, D = x.shape
  f32 = jnp.float32
  hi = jax.lax.Precision.HIGHEST

  def nrm(xv, st, gam, bet):
    mean, rstd = mean_rstd(jnp.sum(st[0], -1, keepdims=True) if norm == "layernorm" else None,
                           jnp.sum(st[1], -1, keepdims=True), D, norm, eps)
    return scale_shift(xv.astype(f32), mean, rstd, gam.astype(f32), None if bet is None else bet.astype(f32)
                       ).astype(dt)

  def proj(xv, name):
    i = WEIGHTS.index(name)
    w, s, b = getattr(p, f"w{name}"), getattr(p, f"s{name}"), getattr(p, f"b{name}")
    wf = w.astype(dt).astype(f32)
    y = jnp.dot(xv.astype(f32), wf.T if trans[i] else wf, precision=hi)
    if s is not None:
      y = y * s.astype(f32)
    if b is not None:
      y = y + b.astype(f32)
    return y

  _, kvh, s_cap, h = k_cache.shape
  h1 = nrm(x, stats, p.ln1_g, p.ln1_b)
  q, k, v = (proj(h1, nm).astype(dt) for nm in "qkv")
  n = q.shape[1] // h
  q, k, v = q.reshape(M, n, h), k.reshape(M, kvh, h), v.reshape(M, kvh, h)
  pos = jnp.minimum(positions.astype(jnp.int32), s_cap - 1)
  if p.rope is not None:
    ang = pos.astype(f32)[:, None, None] * p.rope.astype(f32)                       # [M, 1, h/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def rot(t):
      a, b_ = t[..., : h // 2].astype(f32), t[..., h // 2:].astype(f32)
      return jnp.concatenate([a * cos - b_ * sin, b_ * cos + a * sin], -1).astype(dt)
    q, k = rot(q), rot(k)
  rows_ = jnp.arange(M)
  k_cache = k_cache.at[rows_, :, pos].set(k)
  v_cache = v_cache.at[rows_, :, pos].set(v)
  att = decode_attention_reference(q, k_cache, v_cache, pos + 1, scale=scale).reshape(M, n * h)
  x_mid = (proj(att, "o") + x.astype(f32)).astype(dt)
  h2 = nrm(x_mid, row_stats(x_mid), p.ln2_g, p.ln2_b)
  up = proj(h2, "1").astype(dt).astype(f32)
  if p.wg is not None:
    hh = (kernel_activation(act, proj(h2, "g").astype(dt).astype(f32)) * up).astype(dt)
  else:
    hh = kernel_activation(act, up).astype(dt)
  x_out = (proj(hh, "2") + x_mid.astype(f32)).astype(dt)
  return x_out, row_stats(x_out), k_cache, v_cache
