"""The compiled steps: prefill, insert, generate — with the decode state donated every step.

Slots: the decode state has `max_batch_size` rows ("slots"). A request is prefilled (its prompt runs
through the model once, producing its K/V and its first token), inserted into a free slot, and then
advanced by `generate`, which runs up to N decode steps for all slots inside one `lax.while_loop` on the
device — no host round trip per token. The whole state (K/V cache, token buffer, per-slot counters and
sampling parameters) is one pytree, donated to `insert` and `generate` so it is updated in place.

Shapes: B slots, S = max_seq_len, T = prefill bucket, b = rows in one prefill call.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import sampling
from ftjax.config import ModelConfig
from ftjax.layers import attention, linear
from ftjax.layers.linear import small_m_kernel
from ftjax.models.families import family_for
from ftjax.pallas import ops
from ftjax.pallas._common import default_interpret

AUTO = "auto"   # max_batch_size: size the slots from the device memory left after the weights
# An engine on one device per shard stores each attention block's q, k and v as one packed projection
# (ftjax/layers/attention.py `pack_qkv`); False keeps them apart (read when an engine is built).
PACK_QKV = True
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DecodeState(NamedTuple):
    cache: list            # per layer {"k", "v"}: [B, k, S, h]
    seq: jax.Array         # [B, S] int32: prompt then generated ids
    logprobs: jax.Array    # [B, S] float32: log prob of each generated id at its position
    prompt_len: jax.Array  # [B] int32
    seq_len: jax.Array     # [B] int32: ids in seq; the cache holds seq_len - 1 of them (last one pending)
    gen_count: jax.Array   # [B] int32: generated ids so far
    max_new: jax.Array     # [B] int32
    done: jax.Array        # [B] bool
    active: jax.Array      # [B] bool: slot holds a request
    top_p: jax.Array       # [B] float32: current nucleus (factual-nucleus decay state)
    sp: Any                # sampling.SlotParams, [B] rows
    beam: Any              # sampling.BeamState [G=B, W, S] or None (max_beam_width == 1): group g = head slot g
    group_slots: Any       # [B, W] int32: the slots of the beam group headed by slot g (B = unused)
    group_active: Any      # [B] bool


class Prefix(NamedTuple):
    kv: list               # per layer (k, v): [b, T, k, h]
    first: jax.Array       # [b] int32: first generated id
    first_logprob: jax.Array  # [b] float32


def select(logits, sp, *, seq, prompt_len, seq_len, gen_count, top_p, sampled=True, penalized=True):
    """Per-row decoding of one step: penalties/bans/temperature, then greedy or top-k/top-p draw.
    logits [B, v] -> (ids [B] int32, log probs [B] f32). sampled=False: every row is greedy (static);
    penalized=False: no row has a penalty, min_length or bad words (static)."""
    x = sampling.process_logits(logits, sp, seq, prompt_len, seq_len, gen_count, penalized=penalized)
    return sampling.sample(x, sp, gen_count, top_p, sampled=sampled)


# Admissions whose rows go to consecutive slots in order (a batch into a fresh state; any single request)
# write their K/V into the cache with one in-place update instead of XLA's scatter, which writes at ~0.2 TB/s
# even with its rows materialised first (bench/RESULTS.md, eighth session). False: always the scatter.
INSERT_IN_PLACE = True
# ... for single requests, and for admissions of at least this many prompt tokens (rows x padded length).
# The in-place update is a second compiled variant of the admit; below this size the scatter costs well
# under a millisecond, so a serving process's small multi-request admits keep one variant per shape.
INSERT_IN_PLACE_MIN_TOKENS = 4096
# ... and there, in a family that can (GPT: `writes_prefix_at_prefill`) on one device per shard, each layer's
# prefill writes its K/V into the cache as it goes: on the packed q/k/v path the prefill attention kernel does it
# itself (the caches aliased to its outputs), which removes the admit's two insert kernels a layer (48 of a 1.3B
# batch-1 admit's 406; at 350M batch 64 each layer's ~22 us insert re-read the K/V the kernel had just read).
# Off: on an H100 the admit's GPU time was 3.3% shorter at 1.3B batch 1 and 1.6% at 350M batch 64, requests within
# their noise (twenty-eighth session); it goes on once tests/gpu/check_kvwrite.py passes on a GPU (CI interprets the
# kernel's cache writes); the results are the same either way (tests).
PREFILL_WRITES_KV = False
# The admit writes each per-slot state field (seq, lengths, ~17 sampling parameters, the beam group's fields) as
# a select over all B slots (`where(slot taken, request row, old)`, the rows gathered through one inverse map)
# instead of one scatter per field: elementwise selects of one shape fuse into few kernels, where the scatters
# were ~45 kernels of the admit's ~400 (GPT-350M, batch 64, optimised HLO: bench/RESULTS.md, twenty-fourth
# session), and the admit's CUDA graph launch costs host time per node. Off: with packed q/k/v and the norm
# kernel at every size, a short 1.3B batch-1 A/B was within its noise (twenty-fifth session; the longer one is `bash
# bench/s24_gpu.sh admit1`); the results are the same either way (tests/test_engine.py).
INSERT_SELECT = False
# The admit cut into this many calls along the layers (1: one call): the first embeds the prompts and runs its
# layers, each next one goes on from the residual stream the one before returned, and the last runs the rest,
# samples the first ids and inserts the requests. XLA launches a call's CUDA graph whole before its first kernel
# runs (the admit's ~400 kernels: ~1.5-3 ms of host time at GPT 1.3B batch 1 in which the GPU waits, bench/
# RESULTS.md); in pieces the GPU runs the first piece's layers while the host launches the next. Decoder-only
# families (`prefill_part`) on one device per shard, admits without the int8 dequantising variant. Off until timed
# on a GPU (twenty-eighth session); the results are the same either way (tests/test_admit_pieces.py).
ADMIT_PIECES = 1


def slot_writer(B: int, src, slots):
    """put(a, v) writing request rows into slot rows: a [B, ...] (the state), v [b, ...] (per request); slot
    `slots[i]` takes request row `src[i]`, a slot >= B drops the pair. With INSERT_SELECT a select over all B
    slots through one inverse map, else a scatter per call."""
    if not INSERT_SELECT:
        return lambda a, v: a.at[slots].set(v[src], mode="drop")
    m = slots.shape[0]
    inv = jnp.full((B,), -1, jnp.int32).at[slots].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    taken = inv >= 0
    rows = jnp.asarray(src)[jnp.maximum(inv, 0)]

    def put(a, v):
        new = v[rows].astype(a.dtype)
        return jnp.where(taken.reshape((B,) + (1,) * (a.ndim - 1)), new, a)

    return put


# The decode step compiles the processors (penalties, min_length, bad and stop words: [B, V] scatters and
# word matching each step) only while a live slot needs them (`SamplingParams.penalized`); True compiles
# them in always (the behaviour before; bench/step_ab.py's A/B of the two).
ALWAYS_PENALIZE = False


DECODE_FUSE_ENV = "FTJAX_DECODE_FUSE"
_FUSE_NAMES = {"stats": True, "layer": "layer", "norm": "norm", "stats2": "stats2", "off": False}


def decode_fuse_from_env():
    """Engine.fuse_decode's default: True ("stats"), or what FTJAX_DECODE_FUSE names."""
    v = os.environ.get(DECODE_FUSE_ENV, "stats").strip().lower()
    if v not in _FUSE_NAMES:
        raise ValueError(f"{DECODE_FUSE_ENV}={v!r}: expected one of {sorted(_FUSE_NAMES)}")
    return _FUSE_NAMES[v]


def bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = lo
    while p < n:
        p *= 2
    return min(p, hi)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int | str         # or "auto"
    max_seq_len: int
    dtype: str = "bfloat16"
    attention: str = "auto"
    max_beam_width: int = 4


class Engine:
    """Owns the compiled steps for one model. Nothing here knows about requests, threads or gRPC."""

    def __init__(self, cfg: ModelConfig, params, ecfg: EngineConfig, mesh=None):
        """mesh: a (pipeline, tensor) `jax.sharding.Mesh` (ftjax.sharding.mesh.make_mesh) to run on,
        or None (one device). On a mesh, params and the decode state are placed by the rule table
        (ftjax/sharding/rules.py) and the compiled steps keep those shardings, so donation holds."""
        if ecfg.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown {ecfg.dtype!r}; expected one of {sorted(DTYPES)}")
        if ecfg.max_batch_size != AUTO and (isinstance(ecfg.max_batch_size, bool) or
                                             not isinstance(ecfg.max_batch_size, (int, np.integer)) or
                                             ecfg.max_batch_size < 1):
            raise ValueError(f"max_batch_size: must be an integer >= 1 or 'auto', got {ecfg.max_batch_size!r}")
        if isinstance(ecfg.max_seq_len, bool) or not isinstance(ecfg.max_seq_len, (int, np.integer)):
            raise ValueError(f"max_seq_len: must be an integer, got {ecfg.max_seq_len!r}")
        if not 2 <= ecfg.max_seq_len <= cfg.max_positions:
            raise ValueError(f"max_seq_len: {ecfg.max_seq_len} not in [2, {cfg.max_positions}] "
                             f"(the model's maximum positions)")
        self.cfg, self.ecfg = cfg, ecfg
        self.dtype = DTYPES[ecfg.dtype]
        self.impl = ops.resolve_impl(ecfg.attention)
        self.layout = None
        if mesh is not None:
            from ftjax.sharding.layout import Layout

            self.layout = Layout(cfg, mesh)
            cfg, params = self.layout.prepare(cfg, params)   # vocab padded to a multiple of T
            self.cfg = cfg
        self.family = family_for(cfg, self.dtype, self.impl)
        self.model = self.family.model
        # Decode-step projections (<= 64 rows) through the Pallas small-M kernel: on a GPU with the Pallas
        # attention, one device per shard (a tensor-parallel mesh keeps XLA's partitioned dots). Read when
        # the decode loop is traced; tests set it to run the kernel interpreted on CPU.
        small_m = (self.impl == "pallas" and jax.default_backend() == "gpu"
                   and (self.layout is None or self.layout.mesh.size == 1))
        # INT8 weights' layout: "auto" = stored transposed (QuantizedWeightT) while the small-M kernel runs
        # the decode step (it reads them along K: faster, bench/RESULTS.md), else as loaded; "kn" / "nk"
        # force QuantizedWeight / QuantizedWeightT. Host params are put in that layout before they reach
        # the device; setting `small_m` or `int8_layout` later re-lays the device weights.
        self._int8_layout = "auto"
        self._small_m = small_m
        params = self._int8_relayout(params)
        # One device per shard: each attention block's q/k/v stored as one packed projection (layers/attention.py
        # `pack_qkv`: the prefill's merged GEMM reads it as it is instead of concatenating the three weights every
        # call). Not for the layer kernel (fuse_decode "layer"), which takes them apart: setting it unpacks them.
        self._qkv_packed = (PACK_QKV and self.layout is None and getattr(cfg, "arch", "gpt") != "t5"
                            and decode_fuse_from_env() != "layer")
        if self._qkv_packed:
            params = attention.pack_qkv(params)
        if self.layout is not None:
            self.family = self.layout.wrap_family(self.family)   # pipeline stages when P > 1
            self.params = self.layout.place_params(cfg, params, self.dtype)
        else:
            self.params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype) if _is_float(a) else jnp.asarray(a),
                                       params)
        self.S = ecfg.max_seq_len
        # K/V capacity: max_seq_len rounded up so the attention kernels' key blocks divide it (no pad copy
        # of the cache per step); positions past max_seq_len are never written nor attended.
        self.S_cache = -(-self.S // (16 if self.S <= 128 else 128)) * (16 if self.S <= 128 else 128)
        if ecfg.max_batch_size == AUTO:   # as many slots as the device memory left after the weights holds
            n = self.slots_for_free_memory()
            ecfg = dataclasses.replace(ecfg, max_batch_size=n, max_beam_width=min(ecfg.max_beam_width, n))
            self.ecfg = ecfg
        # Rows of the decode state: at least 2, so that no projection in the decode step is a vector x
        # matrix product (XLA:GPU strength-reduces those below ~10M elements into multiply + reduce
        # fusions that run far below copy bandwidth). `slots` is what requests may use.
        self.slots = ecfg.max_batch_size
        self.B = max(2, ecfg.max_batch_size)
        # With the small-M kernel: the fused decode path of ftjax/models/gpt.py (split-K partials handed to
        # the residual add + norm kernel and to the attention kernel, which writes the new K/V itself); "layer":
        # each decoder block as one persistent kernel (ftjax/pallas/decode_layer.py). FTJAX_DECODE_FUSE sets it
        # for a process (a server, a benchmark): stats (the default), layer, norm, stats2, or off.
        self._fuse_decode = decode_fuse_from_env()
        self._beam_heads: set[int] = set()   # host: slots heading a beam group that may still run
        self._sampled_slots: set[int] = set()   # host: slots holding a request that samples (not greedy)
        # host: slots holding a request with penalties, min_length, bad or stop words (SamplingParams.penalized)
        self._penalized_slots: set[int] = set()
        self.word_capacity = (4, 4)   # (words, tokens per word) of stop/bad word lists; grows by doubling
        self.reset_capacity = 4       # top_p_reset_ids per request
        if not 1 <= ecfg.max_beam_width <= ecfg.max_batch_size:
            raise ValueError(f"max_beam_width: {ecfg.max_beam_width} not in [1, max_batch_size={ecfg.max_batch_size}]")
        self.max_beam_width = ecfg.max_beam_width
        # prefill and insert as ONE executable: a call costs the host milliseconds on the GPU (mostly the
        # launch of its CUDA graph of ~500 kernels, bench/RESULTS.md), and the prompt's K/V go straight into
        # the cache
        # The host inputs of a call travel as ONE int32 array (`pack_words`): each array handed to a jitted
        # call is its own host-to-device copy, and ~25 of them cost the admit call milliseconds of host time.
        opts = self.compiler_options
        admit_opts = dict(opts.get("admit") or {})
        from ftjax.quantize import is_quantized

        def admit_jit(options):
            return jax.jit(self._admit_fn, donate_argnums=(1,), static_argnames=("spec", "sampled", "contiguous"),
                           **_copts(options))

        self._admit_big = None
        if INT8_PREFILL_TRITON and is_quantized(self.params):
            # the prefill's GEMMs on XLA's Triton emitter, which converts int8 weights in its tiles: with cuBLAS
            # allowed, XLA writes a bf16 copy of most int8 weights every prefill (1.3 ms of a 1.3B 512-token
            # prefill on an H200) and the 1.3B int8 512/32 request measured 0.35-3.7% slower (H100, RESULTS.md)
            admit_opts.setdefault("xla_gpu_cublas_fallback", False)
            # Prefills of at least linear.INT8_DEQUANT_ROWS rows dequantise the weights before plain GEMMs:
            # those compile with XLA's default options (cuBLAS allowed), as float weights do.
            self._admit_big = admit_jit(opts.get("admit"))
        self.admit_options = admit_opts   # what the admit call is compiled with (read-only: set compiler_options)
        self._prefill_writes_kv = bool(PREFILL_WRITES_KV and self.layout is None
                                       and getattr(self.family, "writes_prefix_at_prefill", False))
        self._admit = admit_jit(admit_opts)
        self._pieces = None
        L = int(getattr(self.cfg, "num_layers", 0) or 0)
        if (int(ADMIT_PIECES) > 1 and self.layout is None and hasattr(self.family, "prefill_part") and L >= 2
                and hasattr(self.params, "items")):
            P = min(int(ADMIT_PIECES), L)
            bounds = [L * k // P for k in range(P + 1)]
            self._pieces = tuple(zip(bounds[:-1], bounds[1:]))
            self._admit_part = jax.jit(self._admit_part_fn, donate_argnums=(3,), static_argnames=("spec", "lo", "hi"),
                                       **_copts(admit_opts))
            self._admit_last = jax.jit(self._admit_last_fn, donate_argnums=(1,),
                                       static_argnames=("spec", "sampled", "contiguous", "lo"), **_copts(admit_opts))
        self._generate = jax.jit(self._generate_fn, donate_argnums=(1,),
                                 static_argnames=("rem", "chunked", "beam", "sampled", "penalized", "snap",
                                                  "chunk"),
                                 **_copts(opts.get("generate")))
        self._logits = jax.jit(self._logits_fn)
        self._retire = jax.jit(self._retire_sharded, donate_argnums=(0,))

    # ------------------------------------------------------------------------------ int8 layout
    @property
    def small_m(self) -> bool:
        return self._small_m

    @small_m.setter
    def small_m(self, on: bool):
        self._small_m = bool(on)
        self.params = self._int8_relayout(self.params)

    @property
    def fuse_decode(self):
        return self._fuse_decode

    @fuse_decode.setter
    def fuse_decode(self, how):
        if how == "layer" and self._qkv_packed:   # the layer kernel reads q, k and v as three weights
            self.params = attention.unpack_qkv(self.params, self.cfg.num_heads, self.cfg.kv_heads)
            self._qkv_packed = False
        self._fuse_decode = how

    @property
    def int8_layout(self) -> str:
        return self._int8_layout

    @int8_layout.setter
    def int8_layout(self, how: str):
        if how not in ("auto", "kn", "nk"):
            raise ValueError(f"int8_layout: {how!r} is not 'auto', 'kn' or 'nk'")
        self._int8_layout = how
        self.params = self._int8_relayout(self.params)

    def _int8_relayout(self, params):
        """params with the int8 weights in the layout asked for (arrays the caller handed in are never
        deleted here)."""
        from ftjax.quantize import set_int8_layout

        how = self._int8_layout
        return set_int8_layout(params, how == "nk" or (how == "auto" and self._small_m))

    # ------------------------------------------------------------------------------------ state
    def slot_bytes(self) -> int:
        """Device bytes one slot costs on the busiest device: its K/V cache (split over the mesh as the
        rule table splits kv heads and layers), its id / log-prob rows, beam buffers, the decode step's
        [V] logits passes, and a full-length prefill's activations (the largest temporary)."""
        c = self.cfg
        kv = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(jax.eval_shape(lambda: self.family.init_cache(1, self.S_cache))))
        if self.layout is not None:
            T, P = self.layout.mesh.shape["tensor"], self.layout.mesh.shape["pipeline"]
            kv_heads = getattr(c, "kv_heads", getattr(c, "num_heads", 1))
            kv //= P * (T if kv_heads % T == 0 else 1)
        vocab = getattr(c, "vocab", getattr(c, "vocab_size", 0))
        ffn = getattr(c, "ffn_dim", getattr(c, "d_ff", 4 * getattr(c, "hidden", getattr(c, "d_model", 0))))
        rows = 8 * self.S * (1 + 2 * (self.ecfg.max_beam_width > 1))
        return kv + rows + 16 * vocab + 8 * self.S * ffn

    def slots_for_free_memory(self, fraction: float = 0.9, cap: int = 256) -> int:
        """max_batch_size='auto': the slots that fit in `fraction` of the memory free on the fullest
        local device once the weights are there (a multiple of 8 from 8 up, at most `cap`). Backends that
        report no memory (CPU) get 8."""
        jax.block_until_ready(self.params)
        free = []
        for d in jax.local_devices():
            st = d.memory_stats() if hasattr(d, "memory_stats") else None
            if not st or "bytes_limit" not in st:
                return 8
            free.append(st["bytes_limit"] - st.get("bytes_in_use", 0))
        n = int(fraction * min(free) // self.slot_bytes())
        if n < 1:
            raise ValueError(f"max_batch_size='auto': not one slot of max_seq_len {self.S} fits in the "
                             f"{min(free) / 2**30:.2f} GiB left after the weights; lower max_seq_len")
        n = min(n, cap)
        if jax.process_count() > 1:   # every process must build the same state: the smallest answer wins
            from jax.experimental import multihost_utils

            n = int(np.min(multihost_utils.process_allgather(np.int32(n))))
        return n if n < 8 else n // 8 * 8

    def _pack(self, params_list, n):
        return sampling.pack(params_list, n, vocab=self.cfg.vocab, eos_id=self.cfg.eos_id,
                             word_capacity=self.word_capacity, reset_capacity=self.reset_capacity)

    def init_state(self) -> DecodeState:
        if self.layout is not None:   # built on the mesh, on its shardings (every process alike)
            if getattr(self, "_init_sharded", None) is None:
                shapes = jax.eval_shape(self._init_state)
                self._init_sharded = jax.jit(self._init_state, out_shardings=self.layout.state_shardings(shapes))
            return self._init_sharded()
        return self._init_state()

    def _constrain(self, state: DecodeState) -> DecodeState:
        return state if self.layout is None else self.layout.constrain_state(state)

    def _init_state(self) -> DecodeState:
        B, S = self.B, self.S
        cache = self.family.init_cache(B, self.S_cache)
        sp = jax.tree.map(jnp.asarray, self._pack([], B))
        i = lambda v=0: jnp.full((B,), v, jnp.int32)  # noqa: E731
        W = self.max_beam_width
        beam = None
        if W > 1:
            beam = sampling.beam_init(B, W, S)._replace(done=jnp.ones((B,), bool))
        return DecodeState(cache=cache, seq=jnp.zeros((B, S), jnp.int32), logprobs=jnp.zeros((B, S), jnp.float32),
                           prompt_len=i(), seq_len=i(1), gen_count=i(), max_new=i(), done=jnp.ones((B,), bool),
                           active=jnp.zeros((B,), bool), top_p=jnp.zeros((B,), jnp.float32), sp=sp,
                           beam=beam, group_slots=jnp.full((B, W), B, jnp.int32),
                           group_active=jnp.zeros((B,), bool))

    # ------------------------------------------------------------------------------ compiled fns
    def _logits_fn(self, params, *args):  # GPT: (tokens [b, t], lengths) -> [b, t, v]
        return self.family.full_logits(params, *args)

    def _prefill_fn(self, params, tokens, lengths, sp, sampled=True, cache=None, start=None):
        """tokens [b, T]; lengths [b]; sp SlotParams [b] -> Prefix (GPT samples the first id here). With cache
        and start (PREFILL_WRITES_KV) the prefix's kv is the cache with the prompts' K/V written in."""
        at = {} if cache is None else {"cache": cache, "start": start}
        logits, kv = self.family.prefill(params, tokens, lengths, **at)  # [b, v] (or None), family prefix
        return self._prefix(logits, kv, tokens, lengths, sp, sampled)

    def _prefix(self, logits, kv, tokens, lengths, sp, sampled):
        zeros = jnp.zeros_like(lengths)
        if logits is None:
            return Prefix(kv=kv, first=zeros, first_logprob=jnp.zeros(lengths.shape, jnp.float32))
        tok, lp = select(logits, sp, seq=tokens, prompt_len=lengths, seq_len=lengths, gen_count=zeros,
                         top_p=sp.top_p, sampled=sampled)
        return Prefix(kv=kv, first=tok, first_logprob=lp)

    def _admit_part_fn(self, params, words, carry, cache, *, spec, lo: int, hi: int):
        """A piece of the admit before its last (ADMIT_PIECES): layers [lo, hi) of the prefill -> (carry, kv);
        cache: those layers' caches when the layers write the K/V themselves (donated), else None."""
        u = unpack_words(words, spec)
        tokens, lengths, slots = u[0], u[1], u[7]
        return self.family.prefill_part(params, tokens, lengths, carry, lo, hi, False, cache=cache,
                                        start=None if cache is None else slots[0])

    def _admit_last_fn(self, params, state: DecodeState, words, carry, kv_before, *, spec, sampled: bool,
                       contiguous: bool, lo: int):
        """The admit's last piece: layers [lo, L) from `carry`, the first ids, then `_insert_fn`. kv_before: the
        earlier pieces' K/V (None where they wrote them into state's caches)."""
        tokens, lengths, sp, dec_tokens, dec_lengths, max_new, src, slots, gslots = unpack_words(words, spec)
        writes = contiguous and self._prefill_writes_kv
        logits, kv = self.family.prefill_part(params, tokens, lengths, carry, lo, len(state.cache), True,
                                              cache=state.cache[lo:] if writes else None,
                                              start=slots[0] if writes else None)
        if writes:
            state = state._replace(cache=list(state.cache[:lo]) + list(kv))
            prefix = self._prefix(logits, None, tokens, lengths, sp, sampled)
        else:
            prefix = self._prefix(logits, list(kv_before) + list(kv), tokens, lengths, sp, sampled)
        return self._insert_fn(state, prefix, dec_tokens, dec_lengths, max_new, sp, src, slots, gslots,
                               contiguous=contiguous)

    def _admit_fn(self, params, state: DecodeState, words, *, spec, sampled: bool, contiguous: bool = False):
        """_prefill_fn then _insert_fn. `words`/`spec`: pack_words of (tokens, lengths, sp, dec_tokens,
        dec_lengths, max_new, src, slots, gslots) (dec_*: what the decoder's rows start from)."""
        tokens, lengths, sp, dec_tokens, dec_lengths, max_new, src, slots, gslots = unpack_words(words, spec)
        if contiguous and self._prefill_writes_kv:   # the layers write the K/V into the cache themselves
            prefix = self._prefill_fn(params, tokens, lengths, sp, sampled=sampled, cache=state.cache,
                                      start=slots[0])
            state, prefix = state._replace(cache=prefix.kv), prefix._replace(kv=None)
        else:
            prefix = self._prefill_fn(params, tokens, lengths, sp, sampled=sampled)
        return self._insert_fn(state, prefix, dec_tokens, dec_lengths, max_new, sp, src, slots, gslots,
                               contiguous=contiguous)

    def _insert_fn(self, state: DecodeState, prefix: Prefix, tokens, lengths, max_new, sp, src, slots, gslots,
                   contiguous: bool = False):
        """Writes prefilled requests into slots. Request rows [b]: tokens [b, T], lengths, max_new, sp.
        Slot rows [m]: `slots` [m] takes request `src` [m] (a slot >= B drops the row: padding). A beam
        request (sp.beam_width > 1) fills beam_width slots, headed by gslots[i, 0] (gslots [b, W], B = none).
        contiguous: the host has checked that slots = slots[0] + arange(m), src = arange(m) and m = b, so
        the K/V go into the cache as one in-place update (families.write_rows)."""
        T = tokens.shape[1]
        # Rows whose last id stays pending (fed by the first generate step): beam requests, and every
        # request of a family that does not sample at prefill (T5: the decoder start id).
        beam_req = (sp.beam_width > 1) | (not self.family.samples_at_prefill)   # [b]
        cache = state.cache if prefix.kv is None else self.family.write_prefix(   # None: written at prefill
            state.cache, prefix.kv, src, slots, slots[0] if contiguous else None)
        b = tokens.shape[0]
        # Sampled requests: the first id comes from prefill. Beam requests: the last prompt id stays
        # pending, so the first beam step (in generate) sees the prompt's logits in every beam.
        first_at = jnp.where(beam_req, self.S, lengths)   # out of range for beam rows: not written
        row = jnp.zeros((b, self.S), jnp.int32).at[:, :T].set(tokens)
        row = row.at[jnp.arange(b), first_at].set(prefix.first, mode="drop")
        lprow = jnp.zeros((b, self.S), jnp.float32).at[jnp.arange(b), first_at].set(prefix.first_logprob, mode="drop")
        seq_len = jnp.where(beam_req, lengths, lengths + 1)
        ended = ~beam_req & ((prefix.first == sp.end_id) | (max_new <= 1) | sampling.stop_hit(row, seq_len, sp, lengths))
        put = slot_writer(self.B, src, slots)
        st = DecodeState(
            cache=cache, seq=put(state.seq, row), logprobs=put(state.logprobs, lprow),
            prompt_len=put(state.prompt_len, lengths), seq_len=put(state.seq_len, seq_len),
            gen_count=put(state.gen_count, jnp.where(beam_req, 0, 1)), max_new=put(state.max_new, max_new),
            done=put(state.done, ended), active=put(state.active, jnp.ones_like(ended)),
            # the nucleus decays after each generated id: not after a pending one (beam rows, T5's start id)
            top_p=put(state.top_p, jnp.where(beam_req, sp.top_p, sampling.next_top_p(sp.top_p, prefix.first, sp))),
            sp=jax.tree.map(put, state.sp, sp), beam=state.beam, group_slots=state.group_slots,
            group_active=state.group_active)
        if state.beam is not None:
            heads = jnp.where(beam_req, gslots[:, 0], self.B)          # [b]
            fresh = sampling.beam_init(b, self.max_beam_width, self.S, jnp.maximum(sp.beam_width, 1))
            put_head = slot_writer(self.B, jnp.arange(b), heads)
            st = st._replace(
                beam=jax.tree.map(put_head, state.beam, fresh),
                group_slots=put_head(state.group_slots, gslots),
                group_active=put_head(state.group_active, jnp.ones((b,), bool)))
        return self._constrain(st)

    def _beam_update(self, st: DecodeState, logits, nxt):
        """One beam step for every live beam group: picks each beam's next id and reorders the rows
        (K/V cache, ids) so that beam j continues its parent. Returns (state, ids [B], beam-row mask
        [B], rows whose group finished [B])."""
        B = self.B
        gs = st.group_slots                                            # [G, W]
        g_live = st.group_active & ~st.beam.done
        blp = sampling.beam_log_probs(logits, st.sp, st.seq, st.prompt_len, st.seq_len, st.gen_count)  # [B, V]
        glp = blp[jnp.clip(gs, 0, B - 1)]                              # [G, W, V]

        def stops(c_parent, c_tok):   # [G, 2W]: the candidate beams that end with a stop word
            rows = jnp.clip(jnp.take_along_axis(gs, c_parent, 1), 0, B - 1)
            return sampling.stop_hit_candidates(st.seq, st.seq_len, rows, c_tok, st.sp.stop_words)   # group g: slot g's

        beam, parent, btok = sampling.beam_step(
            st.beam, glp, end_id=st.sp.end_id, len_penalty=st.sp.len_penalty,
            diversity_rate=st.sp.diversity_rate, beam_width=st.sp.beam_width, max_new_tokens=st.max_new,
            stops=stops)
        tgt = jnp.where(g_live[:, None] & (gs < B), gs, B).reshape(-1)
        frm = jnp.take_along_axis(gs, parent, 1).reshape(-1)
        src = jnp.arange(B).at[tgt].set(frm, mode="drop")              # row permutation
        is_beam = jnp.zeros((B,), bool).at[tgt].set(True, mode="drop")
        ids = nxt.at[tgt].set(btok.reshape(-1), mode="drop")
        fin = jnp.zeros((B,), bool).at[tgt].set(jnp.repeat(beam.done, gs.shape[1]), mode="drop")
        cache = self.family.reorder(st.cache, src)
        st = st._replace(cache=cache, seq=st.seq[src], logprobs=st.logprobs[src], beam=beam)
        return st, ids, is_beam, fin

    def _generate_fn(self, params, state: DecodeState, n_chunks, *, rem: int, chunked: bool, beam: bool,
                     sampled: bool = True, penalized: bool = True, snap: int = 0, chunk: int = 0):
        """rem + n_chunks * CHUNK decode steps for every live slot, in one call: a loop of `rem` steps
        (static trip count), then (chunked) a while loop over chunks of CHUNK steps, each chunk a loop of
        static trip count. XLA:GPU evaluates a while loop's condition on the host (a device-to-host copy and
        a wait per iteration); a loop of known trip count runs without one, so the host waits once per
        CHUNK steps, and not at all for a call without the while loop (generate_steps: fewer than
        2 * CHUNK steps). The while loop stops early once every slot is done; steps of the static loops
        after that change nothing (every row is masked).
        beam: compile the beam-search step in (the host knows whether any beam group may be live; a
        `lax.cond` on it would cost another host round trip per step). sampled: likewise whether any live
        slot samples (else the draw and the nucleus decay are not compiled in: argmax only). penalized:
        whether any live slot has a penalty, min_length, bad or stop words (else the [B, V] scatters of the
        penalties and the word matching are not compiled in; outputs are the same either way). chunk: steps
        per while-loop iteration (0: CHUNK); 1 is steps_mode "dynamic"."""
        chunk = chunk or self.CHUNK
        B, S = self.B, self.S
        rows = jnp.arange(B)

        def step(st, count):   # every step a call runs is one it was asked for: no step index needed
            pos = st.seq_len - 1                               # [B] where the pending id goes in the cache
            tok = st.seq[rows, pos]
            live = st.active & ~st.done
            # A row that is not live (free slot, or finished and not yet retired) decodes at position 0: its
            # outputs are discarded, and its attention then reads one key block instead of its whole past
            # (it never resumes: an insert rewrites the slot, cache included)
            dpos = jnp.where(live, pos, 0)
            with small_m_kernel(self.small_m, interpret=default_interpret(), fuse=self.fuse_decode):
                logits, cache = self.family.decode(params, tok, dpos, st.cache)
            nxt, lp = select(logits, st.sp, seq=st.seq, prompt_len=st.prompt_len, seq_len=st.seq_len,
                             gen_count=st.gen_count, top_p=st.top_p, sampled=sampled, penalized=penalized)
            st = st._replace(cache=cache)
            beam_row = beam_fin = jnp.zeros((B,), bool)
            if beam and st.beam is not None:
                st, nxt, beam_row, beam_fin = self._beam_update(st, logits, nxt)
                cache = st.cache
            at = jnp.minimum(st.seq_len, S - 1)
            seq = st.seq.at[rows, at].set(jnp.where(live, nxt, st.seq[rows, at]))
            logprobs = st.logprobs.at[rows, at].set(jnp.where(live, lp, st.logprobs[rows, at]))
            seq_len = st.seq_len + live
            gen_count = st.gen_count + live
            ended = (nxt == st.sp.end_id) | (gen_count >= st.max_new)
            if penalized:
                ended |= sampling.stop_hit(seq, seq_len, st.sp, st.prompt_len)
            ended = jnp.where(beam_row, beam_fin, ended)
            done = st.done | (live & ended)
            # the decayed nucleus only matters to a row that samples
            top_p = jnp.where(live, sampling.next_top_p(st.top_p, nxt, st.sp), st.top_p) if sampled else st.top_p
            st = self._constrain(st._replace(cache=cache, seq=seq, logprobs=logprobs, seq_len=seq_len,
                                             gen_count=gen_count, done=done, top_p=top_p))
            return st, count + jnp.any(live).astype(jnp.int32)

        def cond(carry):
            i, st, _ = carry
            return (i < n_chunks * chunk) & jnp.any(st.active & ~st.done)

        def body(carry):
            i, st, count = carry
            st, count = jax.lax.fori_loop(0, chunk, lambda _, c: step(*c), (st, count))
            return i + chunk, st, count

        # The static steps first: they follow the previous call on the device without a host round trip;
        # each evaluation of the while loop's condition then waits for the device and exposes the next
        # chunk's launch (~1 ms on an H100 under the profiler; a 350M 512/32 request 28.26 -> 27.93 ms without
        # the two it had, bench/RESULTS.md fourteenth session).
        state, steps = self._constrain(state), jnp.int32(0)
        if rem:
            state, steps = jax.lax.fori_loop(0, rem, lambda _, c: step(*c), (state, steps))
        if chunked:
            _, state, steps = jax.lax.while_loop(cond, body, (jnp.int32(0), state, steps))
        state = self._constrain(state)
        if snap:   # the server's snapshot, in the same executable (one call less per scheduler iteration)
            return state, steps, self._snapshot_fn(state, width=snap, beam=beam)
        return state, steps

    def _snapshot_fn(self, state: DecodeState, *, width: int, beam: bool = False):
        """What a server needs after a generate call, small and not donated: seq_len [B], done [B], and
        the last `width` ids and log probs of every row ([B, width]; column -1 is seq[seq_len - 1]); with
        `beam` (a beam group may be live) also the finished hypotheses (fin_tokens, fin_logprobs, fin_len,
        fin_mask of sampling.BeamState), so that no reader needs the (donated) state itself."""
        idx = jnp.clip(state.seq_len[:, None] - width + jnp.arange(width)[None, :], 0, self.S - 1)
        out = {"seq_len": state.seq_len, "done": state.done,
               "ids": jnp.take_along_axis(state.seq, idx, axis=1),
               "logprobs": jnp.take_along_axis(state.logprobs, idx, axis=1)}
        if beam and state.beam is not None:
            out.update({k: getattr(state.beam, k) for k in ("fin_tokens", "fin_logprobs", "fin_len", "fin_mask")})
            out["seq"] = state.seq   # a streamed beam shows its lead beam whole: its earlier ids may change
        return out

    @staticmethod
    def _retire_fn(state: DecodeState, slots):
        """Frees `slots` [n] (a slot >= B is ignored): the rows stop decoding at once."""
        put = lambda a, v: a.at[slots].set(v, mode="drop")  # noqa: E731
        return state._replace(active=put(state.active, False), done=put(state.done, True),
                              group_active=put(state.group_active, False))

    def _retire_sharded(self, state: DecodeState, slots):
        return self._constrain(self._retire_fn(state, slots))

    # ------------------------------------------------------------------------------- host side
    def check_prompt(self, ids, max_new: int, field: str = "prompts"):
        if len(ids) == 0:
            raise ValueError(f"{field}: empty prompt")
        V = self.cfg.vocab
        a = int_row(ids)
        if a is not None:   # one vector test, not a loop per id
            bad = np.flatnonzero((a < 0) | (a >= V))
            first = int(a[bad[0]]) if bad.size else None
        else:
            first = next((t for t in ids if not 0 <= int(t) < V), None)
        if first is not None:
            raise ValueError(f"{field}: token id {first} outside the vocabulary [0, {V})")
        if len(ids) > self.S:
            raise ValueError(f"{field}: {len(ids)} tokens exceed max_seq_len {self.S}")
        if not self.family.samples_at_prefill:  # encoder-decoder: the prompt is the encoder's input
            if 1 + max_new > self.S:
                raise ValueError(f"max_new_tokens: {max_new} (+ the decoder start id) exceeds max_seq_len {self.S}")
        elif len(ids) + max_new > self.S:
            raise ValueError(f"max_new_tokens: prompt of {len(ids)} tokens + max_new_tokens {max_new} exceeds "
                             f"max_seq_len {self.S}")

    def prefill_insert(self, state: DecodeState, prompts, slots, max_new, params_list) -> DecodeState:
        """Prefill `prompts` (lists of ids) and insert them. slots[i]: an int, or for a beam request a
        list of beam_width ints (the first heads the beam group). Host ints; the state is donated."""
        n = len(prompts)
        T = bucket(max(len(p) for p in prompts), 16, self.S)
        b = bucket(n, 1, self.B)
        W = self.max_beam_width
        tokens = np.zeros((b, T), np.int32)
        lengths = np.ones((b,), np.int32)
        mx = np.zeros((b,), np.int32)
        gslots = np.full((b, W), self.B, np.int32)
        src, dst = [], []
        for i, (p, sl, prm) in enumerate(zip(prompts, slots, params_list)):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
            mx[i] = max_new[i]
            sl = [int(sl)] if np.ndim(sl) == 0 else [int(x) for x in sl]
            if len(sl) != prm.beam_width:
                raise ValueError(f"slots: request {i} has beam_width {prm.beam_width} but {len(sl)} slots")
            if prm.beam_width > 1:
                gslots[i, : len(sl)] = sl
                self._beam_heads.add(sl[0])
            else:
                self._beam_heads.difference_update(sl)
            if prm.beam_width == 1 and not prm.greedy:
                self._sampled_slots.update(sl)
            else:
                self._sampled_slots.difference_update(sl)
            if prm.penalized:
                self._penalized_slots.update(sl)
            else:
                self._penalized_slots.difference_update(sl)
            src += [i] * len(sl)
            dst += sl
        m = bucket(len(dst), 1, self.B)
        src_arr = np.zeros((m,), np.int32)
        dst_arr = np.full((m,), self.B, np.int32)
        src_arr[: len(src)] = src
        dst_arr[: len(dst)] = dst
        state = self._grow_capacity(state, params_list)
        sp = self._pack(list(params_list), b)
        dec_tokens, dec_lengths = tokens, lengths
        if not self.family.samples_at_prefill:
            # Encoder-decoder: the decoder sequence starts as [start_id], pending for the first step.
            start = [self.cfg.bos_id if p.start_id is None else p.start_id for p in params_list]
            dec_tokens = np.zeros((b, 1), np.int32)
            dec_tokens[: len(start), 0] = start
            dec_lengths = np.ones((b,), np.int32)
        words, spec = pack_words((tokens, lengths, sp, dec_tokens, dec_lengths, mx, src_arr, dst_arr, gslots))
        contiguous = (INSERT_IN_PLACE and (m == 1 or m * T >= INSERT_IN_PLACE_MIN_TOKENS)
                      and len(dst) == m == b and src == list(range(m))
                      and dst == list(range(dst[0], dst[0] + m)) and dst[-1] < self.B)
        admit = self._admit
        if self._admit_big is not None and linear.int8_dequantised(tokens.size):
            admit = self._admit_big
        sampled = any(p.beam_width == 1 and not p.greedy for p in params_list)
        if self._pieces is not None and admit is self._admit:
            return self._admit_in_pieces(state, words, spec, contiguous, sampled)
        return admit(self.params, state, words, spec=spec, contiguous=contiguous, sampled=sampled)

    def _admit_in_pieces(self, state: DecodeState, words, spec, contiguous: bool, sampled: bool) -> DecodeState:
        """The admit as len(self._pieces) calls (ADMIT_PIECES), dispatched back to back (nothing waits on the
        device in between)."""
        words = jnp.asarray(words)   # one host-to-device copy for all the pieces
        writes = contiguous and self._prefill_writes_kv
        sub = self.family.part_params
        carry, kv_before = None, []
        for lo, hi in self._pieces[:-1]:
            carry, kv = self._admit_part(sub(self.params, lo, hi, False), words, carry,
                                         state.cache[lo:hi] if writes else None, spec=spec, lo=lo, hi=hi)
            kv_before += kv
        lo, hi = self._pieces[-1]
        if writes:   # the earlier layers' caches were donated to the pieces that wrote them
            state = state._replace(cache=kv_before + list(state.cache[lo:]))
            kv_before = None
        return self._admit_last(sub(self.params, lo, hi, True), state, words, carry, kv_before, spec=spec,
                                sampled=sampled, contiguous=contiguous, lo=lo)

    def _grow_capacity(self, state: DecodeState, params_list) -> DecodeState:
        """Word-list / reset-id capacities grow (doubling) when a request needs more; the running slots'
        rows are padded, nothing in flight is lost. A new capacity compiles the steps once more."""
        W, L = sampling.word_capacity_for(params_list, self.word_capacity)
        R = max([self.reset_capacity] + [len(p.top_p_reset_ids) for p in params_list])
        while R > self.reset_capacity:
            self.reset_capacity *= 2
        self.word_capacity = (W, L)
        # the state's own shapes decide: another state of this engine may have grown the capacity meanwhile
        if (tuple(state.sp.bad_words.shape[1:]) == (W, L)
                and state.sp.top_p_reset_ids.shape[1] == self.reset_capacity):
            return state

        def words(a):  # [B, W0, L0] right-aligned -> [B, W, L]
            return jnp.pad(a, ((0, 0), (0, W - a.shape[1]), (L - a.shape[2], 0)), constant_values=-1)

        r = state.sp.top_p_reset_ids
        sp = state.sp._replace(bad_words=words(state.sp.bad_words), stop_words=words(state.sp.stop_words),
                               top_p_reset_ids=jnp.pad(r, ((0, 0), (0, self.reset_capacity - r.shape[1])),
                                                       constant_values=-1))
        return state._replace(sp=sp)

    def release_slots(self, slots) -> None:
        """Host only: the rows of these slots have ended (their requests finished), so the decode step no
        longer needs what they asked for. The slots leave the host-side sets that choose the compiled variant
        of the next generate calls (sampling, processors, beam search); without this a finished sampled or
        penalised request keeps every later greedy step on the slower variant until its slot is reused. No
        device work: a finished row stays done in the state."""
        s = {int(x) for x in slots}
        self._beam_heads.difference_update(s)
        self._sampled_slots.difference_update(s)
        self._penalized_slots.difference_update(s)

    def retire(self, state: DecodeState, slots) -> DecodeState:
        """Cancel/free slots (host ints); their rows stop decoding immediately."""
        arr = np.full((self.B,), self.B, np.int32)
        arr[: len(slots)] = slots
        self.release_slots(slots)
        return self._retire(state, arr)

    CHUNK = 16   # decode steps per host round trip inside generate

    # XLA options per executable ({"admit": {...}, "generate": {...}}, jax.jit's compiler_options), read
    # when an Engine is built: e.g. {"admit": {"xla_gpu_enable_command_buffer": ""}} (bench/request_ab.py).
    compiler_options: dict = {}

    # "pieces": n = q * CHUNK + r runs as one call for the q chunks (with r's top bit, 8, folded in) and
    # one call per remaining binary digit of r (4, 2, 1): at most 4 calls, and at most 2 x 4 loop shapes
    # compiled per (beam, sampled) whatever n is. "exact": one call, compiled per (n mod CHUNK, n >= CHUNK,
    # n >= 2 * CHUNK): a static loop of n steps below 2 * CHUNK, else of CHUNK + n mod CHUNK steps followed
    # by a while loop over the remaining chunks.
    # "dynamic": one call and one loop shape for every n: a while loop of single steps, whose condition
    # XLA:GPU evaluates on the device only when WHILE is among the command-buffer types of the generate
    # executable (compiler_options); otherwise the host waits on it every step.
    # Default "exact" (H100, bench/request_ab.py): a 128/8 request at 350M takes 10.5 ms exact, 11.5 ms in
    # pieces (7 steps = 3 calls), 26 ms dynamic with WHILE command buffers; and its first request compiles
    # one loop shape, not three.
    steps_mode = "exact"
    # "exact": a call's first CHUNK steps run in its static loop (False: in the while loop, as before the
    # fourteenth session; bench/request_ab.py's A/B of the two)
    static_first_chunk = True

    def generate_steps(self, state: DecodeState, n_steps: int, *, snap: int = 0):
        """Runs up to n_steps decode steps (fewer when every slot finishes). -> (state, steps run), and with
        snap > 0 also `_snapshot_fn(state, width=snap)` computed by the last call."""
        n = int(n_steps)
        beam = bool(self._beam_heads) and self.max_beam_width > 1
        sampled = bool(self._sampled_slots)
        # beam search applies the processors inside its own step (sampling.beam_log_probs) whatever this says
        penalized = bool(self._penalized_slots) or ALWAYS_PENALIZE
        q, r = divmod(n, self.CHUNK)
        if self.steps_mode == "dynamic":
            out = self._generate(self.params, state, np.int32(n), rem=0, chunked=n > 0, beam=beam,
                                 sampled=sampled, penalized=penalized, snap=snap, chunk=1)
            return out if snap else out[:2]
        if self.steps_mode == "exact":
            # the first chunk is static too (the while loop's first check could only skip a call made with
            # no live slot): no host round trip below 2 * CHUNK steps, one less above
            calls = [(q - 1, self.CHUNK + r)] if q and self.static_first_chunk else [(q, r)]
        else:
            first = r & 8 if q > 0 else (1 << (r.bit_length() - 1) if r else 0)   # r's top piece rides along
            calls = [(q, first)] + [(0, b) for b in (4, 2, 1) if r & b and b != first]
        calls = [c for c in calls if c != (0, 0)] or [(0, 0)]
        total = None
        for k, (cq, cr) in enumerate(calls):
            out = self._generate(self.params, state, np.int32(cq), rem=cr, chunked=cq > 0, beam=beam,
                                 sampled=sampled, penalized=penalized,
                                 snap=snap if k == len(calls) - 1 else 0)
            state, steps = out[:2]
            total = steps if total is None else total + steps
        return (state, total, out[2]) if snap else (state, total)

    def generate_snap(self, state: DecodeState, n_steps: int):
        """generate_steps, then a small snapshot of the result (`_snapshot_fn`, width n_steps + 1: enough
        for every id a slot can have gained since the previous call, prefill's first id included), computed
        inside the last generate call. -> (state, steps, snapshot dict of device arrays)."""
        return self.generate_steps(state, n_steps, snap=int(n_steps) + 1)

    def logits(self, *arrays):
        """GPT: (tokens, lengths); T5: (enc_tokens, enc_len, dec_tokens, dec_len) -> full logits."""
        return self._logits(self.params, *arrays)


# Engines with int8 weights compile their admit (prefill) call with xla_gpu_cublas_fallback=False (see
# Engine.__init__); False keeps XLA's default choice between cuBLAS and its Triton GEMMs.
INT8_PREFILL_TRITON = True


def _copts(options) -> dict:
    return {"compiler_options": dict(options)} if options else {}


_WORD_DTYPES = ("int32", "uint32", "float32", "bool")


def int_row(ids):
    """`ids` as a 1-D integer numpy array when numpy takes them as plain integers (one conversion, no loop
    per id); None for anything else (floats, strings, ints beyond int64, nested rows)."""
    if not isinstance(ids, np.ndarray):
        try:
            ids = np.asarray(ids)
        except (TypeError, ValueError, OverflowError):
            return None
    return ids if ids.ndim == 1 and ids.dtype.kind in "iu" else None


def pack_words(tree):
    """A pytree of numpy arrays (int32 / uint32 / float32 / bool) -> (one int32 vector, spec): what a jitted
    call unpacks with `unpack_words(vector, spec)`. The spec (tree structure, shapes, dtypes) is hashable,
    for a static argument; the vector is one host-to-device copy instead of one per array."""
    leaves, treedef = jax.tree.flatten(tree)
    parts, shapes = [], []
    for a in leaves:
        a = np.asarray(a)
        if a.dtype.name not in _WORD_DTYPES:
            raise TypeError(f"pack_words: {a.dtype} not one of {_WORD_DTYPES}")
        shapes.append((a.shape, a.dtype.name))
        a = np.ascontiguousarray(a)
        parts.append((a.astype(np.int32) if a.dtype == bool else a.view(np.int32)).reshape(-1))
    words = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return words, (treedef, tuple(shapes))


def unpack_words(words, spec):
    """Inverse of pack_words, traced: slices and bitcasts of the int32 vector."""
    treedef, shapes = spec
    out, o = [], 0
    for shape, dt in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        w = words[o: o + n].reshape(shape)
        o += n
        if dt == "bool":
            w = w != 0
        elif dt != "int32":
            w = jax.lax.bitcast_convert_type(w, jnp.dtype(dt))
        out.append(w)
    return jax.tree.unflatten(treedef, out)


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype, jnp.floating)
