"""Decoding controls: `SamplingParams` (one validated object per request) and the on-device
sampler, penalties, word lists and beam search the engine runs inside its compiled decode loop.

Host side
---------
`SamplingParams` holds FasterTransformer's per-request fields with FT's defaults (CONTRACTS.md).
Request-only checks run at construction, model-dependent ones in `verify(vocab_size,
max_beam_width)`; every error is a `ValueError` whose message names the field.
`params_for_batch(n, params=None, **decoding)` expands the library's keywords (a scalar for every
prompt, a list of scalars for one per prompt, word lists for every prompt).
`pack(params_list, num_slots, vocab=..., eos_id=...)` turns requests into `SlotParams`, numpy arrays
with a leading slot dimension and fixed capacities, so new values never change shapes.

Device side (pure jnp, fixed shapes, jit/while_loop friendly)
-------------------------------------------------------------
    x = process_logits(logits, sp, seq, prompt_len, seq_len, gen_count)   # penalties, bans, temperature
    tok, logprob = sample(x, sp, gen_count, top_p_cur)                    # greedy / top-k / top-p draw
    top_p_cur = next_top_p(top_p_cur, tok, sp)                            # factual nucleus
    stopped = stop_hit(seq, seq_len, sp, prompt_len)                       # after appending tok
Beam search: `beam_log_probs` (log-softmax of logits / temperature as FT, then HF's processors on it),
`beam_init` / `beam_reset` / `beam_step` over a `BeamState` of G groups x W beams, which also keeps
the finished hypotheses (tokens, per-token log probs, scores), best first.

Semantics chosen (documented once here)
---------------------------------------
* Order (HF's): repetition penalty -> presence penalty -> bad words -> min_length -> temperature.
  Repetition penalty (HF/FT multiplicative: x<0 -> x*p, else x/p) counts every token of prompt +
  output once; presence penalty is subtracted once from tokens already generated. Temperature 0
  means greedy and divides by 1. FT forbids repetition and presence penalty together; we allow both.
* Log prob: `log_softmax(x)[tok]` where x are the processed logits (after penalties, bans and
  temperature, BEFORE top-k/top-p truncation): the FT `cum_log_probs` definition, and equal to HF
  `compute_transition_scores(normalize_logits=True)` for greedy and beam search.
* Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept, as HF's
  `TopKLogitsWarper`). Top-p then works on the softmax renormalised over the top-k set (HF's
  `TopPLogitsWarper` after top-k; FT's top-k-then-top-p): a token is kept iff the probability mass of
  tokens strictly more likely than it is < p (the smallest prefix whose mass reaches p, ties at the
  boundary all kept; at least one token always kept; p >= 1 keeps all). Kept sets are thresholds on
  the logit value, so they never depend on a sort's tie order.
* Draw: Gumbel-max over the kept set with a uniform per (random_seed, gen_count, token id): a
  threefry key per (seed, step), then a cheap 32-bit integer hash of (key, token id): the token depends only on the row's own logits, params, seed and step — never
  on the batch, the slot or which code path ran. Exact sampling from the filtered softmax.
* Cost (H100, B=128, V=50257): an argmax + logsumexp over [B, V] (0.07 ms) always; if any row
  samples, a `lax.top_k(x, max_top_k=16)` (XLA:GPU's small-k kernel, 0.18 ms; k > 16 is a full
  sort, so a bigger bucket buys nothing). Only when some row's kept set may extend beyond those
  candidates (top_k >= 16, a top-p nucleus wider than 16 tokens, boundary ties) does a `lax.cond`
  run a full descending sort of [B, V] (0.5 ms) and a [B, V] Gumbel draw, and only those rows take
  its result.
* Factual nucleus (FT `computeToppDecay`): after each step p <- max(p * top_p_decay, top_p_min),
  reset to the request's top_p when the token just generated is one of top_p_reset_ids.
* Beam search follows HF transformers 5.x `_beam_search` with `early_stopping=False`: 2w candidates
  per group from cum + log prob, the best w that did not hit end_id continue, those among the top w
  that hit end_id (or the length limit) enter the finished set with score cum / len ** len_penalty
  (len counts generated tokens including end_id), a finished set of w kept best first, HF's
  "can a running beam still improve" stopping heuristic. FT's beam_search_diversity_rate adds
  `rate * rank` (rank 0.. of the token among its parent's candidates) to the candidate's score, which
  is carried in the running score (FT's kernel); a negative rate penalises siblings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODEL_DEFAULT", "SamplingParams", "params_for_batch", "SlotParams", "pack", "word_capacity_for",
    "process_logits", "sample", "filter_logits", "next_top_p", "stop_hit", "beam_log_probs", "BeamState", "beam_init",
    "beam_reset", "beam_step", "NEG",
]

NEG = -1.0e9  # HF's "very large negative" used by beam search bookkeeping


class _ModelDefault:
    _inst = None

    def __new__(cls):
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self):
        return "MODEL_DEFAULT"

    def __reduce__(self):
        return (_ModelDefault, ())


MODEL_DEFAULT = _ModelDefault()
"""end_id / start_id sentinel: use the model's own eos / bos."""

# ----------------------------------------------------------------------------------------------
# Host side: SamplingParams
# ----------------------------------------------------------------------------------------------

_WORD_FIELDS = ("stop_words", "bad_words")
_SEQ_FIELDS = _WORD_FIELDS + ("top_p_reset_ids",)


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _as_int(name, v.item())
    raise ValueError(f"{name} must be an integer, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating, np.ndarray)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
        v = v.item()
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _decode_ft_words(name: str, arr: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """FT's [2, L] (or [1, 2, L]) encoding: row 0 concatenated ids, row 1 cumulative end offsets, -1 pad."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise ValueError(f"{name}: an array must be FT's [2, L] word-list encoding, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: FT word-list encoding must be integer, got {arr.dtype}")
    ids, offs = arr[0].astype(np.int64), arr[1].astype(np.int64)
    n = int(np.sum(offs >= 0))
    if np.any(offs[n:] >= 0) or np.any(offs[:n] < 0):
        raise ValueError(f"{name}: FT offsets (row 1) must be followed only by -1 padding")
    words, start = [], 0
    for end in offs[:n]:
        end = int(end)
        if end <= start or end > ids.shape[0]:
            raise ValueError(f"{name}: FT offsets (row 1) must be strictly increasing and <= {ids.shape[0]}, got {offs[:n].tolist()}")
        words.append(tuple(int(t) for t in ids[start:end]))
        start = end
    return tuple(words)


def _normalise_words(name: str, v: Any) -> tuple[tuple[int, ...], ...]:
    if v is None:
        return ()
    if isinstance(v, np.ndarray):
        return _check_words(name, _decode_ft_words(name, v))
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{name} must be a list of token-id sequences or FT's [2, L] array, got {type(v).__name__}")
    words = []
    for w in v:
        if isinstance(w, np.ndarray):
            if w.ndim != 1:
                raise ValueError(f"{name}: each word must be a 1-D token sequence, got shape {w.shape}")
            w = w.tolist()
        if isinstance(w, (str, bytes)) or not isinstance(w, Sequence):
            raise ValueError(f"{name}: each entry must be a sequence of token ids, got {w!r}")
        words.append(tuple(_as_int(name, t) for t in w))
    return _check_words(name, tuple(words))


def _check_words(name, words):
    for w in words:
        if len(w) == 0:
            raise ValueError(f"{name}: empty token sequence")
        if any(t < 0 for t in w):
            raise ValueError(f"{name}: token ids must be >= 0, got {list(w)}")
    return words


# |len_penalty| and |beam_search_diversity_rate| above this overflow beam search's float32 scores (length **
# len_penalty, rate x rank summed over the steps) to inf / NaN, and the request ends with no hypothesis.
BEAM_SCALE_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding controls, FasterTransformer's names and defaults."""

    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    min_length: int = 0
    len_penalty: float = 1.0
    beam_width: int = 1
    beam_search_diversity_rate: float = 0.0
    random_seed: int = 0
    start_id: Any = None            # None -> model's bos
    end_id: Any = MODEL_DEFAULT     # MODEL_DEFAULT -> model's eos; None -> never end
    stop_words: Any = ()
    bad_words: Any = ()
    return_log_probs: bool = False
    top_p_decay: float = 1.0        # 1.0 = off
    top_p_min: float = 1e-6         # FT's default floor (only matters when top_p_decay < 1)
    top_p_reset_ids: Any = ()       # tokens that reset the decayed p to top_p

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for k in ("top_k", "min_length", "beam_width", "random_seed"):
            s(k, _as_int(k, getattr(self, k)))
        for k in ("top_p", "temperature", "repetition_penalty", "presence_penalty", "len_penalty",
                  "beam_search_diversity_rate", "top_p_decay", "top_p_min"):
            s(k, _as_float(k, getattr(self, k)))
        for k in ("top_k", "min_length", "beam_width"):   # int32 on the device
            if getattr(self, k) >= 2**31:
                raise ValueError(f"{k} must be < 2**31, got {getattr(self, k)}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for k in ("len_penalty", "beam_search_diversity_rate"):   # beam scores stay finite in float32
            if abs(getattr(self, k)) > BEAM_SCALE_MAX:
                raise ValueError(f"{k} must be within +-{BEAM_SCALE_MAX:g}, got {getattr(self, k)}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if not 0 <= self.random_seed < 2**64:
            raise ValueError(f"random_seed must be in [0, 2**64), got {self.random_seed}")
        if not 0.0 < self.top_p_decay <= 1.0:
            raise ValueError(f"top_p_decay must be in (0, 1], got {self.top_p_decay}")
        if not 0.0 <= self.top_p_min <= 1.0:
            raise ValueError(f"top_p_min must be in [0, 1], got {self.top_p_min}")
        if self.start_id is not None:
            s("start_id", _as_int("start_id", self.start_id))
            if self.start_id < 0:
                raise ValueError(f"start_id must be >= 0, got {self.start_id}")
        if self.end_id is not None and self.end_id is not MODEL_DEFAULT:
            s("end_id", _as_int("end_id", self.end_id))
            if self.end_id < 0:
                raise ValueError(f"end_id must be >= 0 (None = never end), got {self.end_id}")
        if not isinstance(self.return_log_probs, (bool, np.bool_)):
            raise ValueError(f"return_log_probs must be a bool, got {self.return_log_probs!r}")
        s("return_log_probs", bool(self.return_log_probs))
        for k in _WORD_FIELDS:
            s(k, _normalise_words(k, getattr(self, k)))
        r = self.top_p_reset_ids
        if r is None:
            r = ()
        elif isinstance(r, np.ndarray):
            r = r.reshape(-1).tolist()
        elif not isinstance(r, Sequence) or isinstance(r, (str, bytes)):
            r = (r,)
        r = tuple(_as_int("top_p_reset_ids", t) for t in r)
        if any(t < -1 for t in r):
            raise ValueError(f"top_p_reset_ids must be token ids (-1 = none), got {list(r)}")
        s("top_p_reset_ids", tuple(t for t in r if t >= 0))

    @property
    def penalized(self) -> bool:
        """Whether the request needs the per-step processors besides temperature: a repetition or presence
        penalty, min_length, bad words or stop words (the engine compiles those into its decode step only
        while a live slot needs them)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.min_length > 0
                or bool(self.bad_words) or bool(self.stop_words))

    @property
    def greedy(self) -> bool:
        """FT: no top-k and no top-p filter is greedy; so are temperature 0 and top_k 1."""
        return (self.top_k == 0 and self.top_p == 0.0) or self.temperature == 0.0 or self.top_k == 1

    def verify(self, vocab_size: int, max_beam_width: int = 1) -> "SamplingParams":
        """Model-dependent checks; returns self."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be <= vocab size {vocab_size}, got {self.top_k}")
        if self.beam_width > max_beam_width:
            raise ValueError(f"beam_width must be <= {max_beam_width} (the configured maximum), got {self.beam_width}")
        for k in ("start_id", "end_id"):
            v = getattr(self, k)
            if isinstance(v, int) and v >= vocab_size:
                raise ValueError(f"{k} {v} is outside the vocabulary (size {vocab_size})")
        for k in _WORD_FIELDS:
            for w in getattr(self, k):
                if any(t >= vocab_size for t in w):
                    raise ValueError(f"{k}: token ids must be < vocab size {vocab_size}, got {list(w)}")
        if any(t >= vocab_size for t in self.top_p_reset_ids):
            raise ValueError(f"top_p_reset_ids must be < vocab size {vocab_size}, got {list(self.top_p_reset_ids)}")
        return self

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_kwargs(cls, n_prompts: int, **decoding) -> list["SamplingParams"]:
        return params_for_batch(n_prompts, **decoding)


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def params_for_batch(n: int, params=None, **decoding) -> list[SamplingParams]:
    """CONTRACTS.md's keyword expansion -> one SamplingParams per prompt.

    `params`: a SamplingParams (every prompt) or a list of n of them (then no keywords).
    Keywords: a scalar applies to every prompt, a list/tuple/1-D array of n scalars gives one per
    prompt; word lists and top_p_reset_ids always apply to every prompt.
    """
    for k in decoding:
        if k not in _FIELDS:
            raise ValueError(f"unknown decoding keyword {k!r}")
    if params is not None:
        if decoding:
            raise ValueError(f"params= and decoding keywords ({', '.join(sorted(decoding))}) cannot be combined")
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be a SamplingParams or a list of {n} of them")
        return params
    per_prompt: dict[str, list] = {}
    common: dict[str, Any] = {}
    for k, v in decoding.items():
        if k in _SEQ_FIELDS:
            common[k] = v
        elif isinstance(v, np.ndarray) and v.ndim == 1 or isinstance(v, (list, tuple)):
            v = list(v)
            if len(v) != n:
                raise ValueError(f"{k}: a list gives one value per prompt and must have {n} entries, got {len(v)}")
            per_prompt[k] = v
        else:
            common[k] = v
    base = SamplingParams(**common)
    if not per_prompt:
        return [base] * n
    return [dataclasses.replace(base, **{k: v[i] for k, v in per_prompt.items()}) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Host -> device: SlotParams
# ----------------------------------------------------------------------------------------------


class SlotParams(NamedTuple):
    """Per-slot decoding parameters, leading dim B (slots). Word lists are right-aligned, -1 padded."""

    top_k: Any               # [B] int32, 0 = off
    top_p: Any               # [B] f32, 0 = off (the request's initial p)
    temperature: Any         # [B] f32, 0 = greedy
    repetition_penalty: Any  # [B] f32
    presence_penalty: Any    # [B] f32
    min_length: Any          # [B] int32
    end_id: Any              # [B] int32, -1 = none
    seed: Any                # [B, 2] uint32 (hi, lo) threefry key data
    top_p_decay: Any         # [B] f32
    top_p_min: Any           # [B] f32
    top_p_reset_ids: Any     # [B, R] int32, -1 pad
    bad_words: Any           # [B, W, L] int32, right-aligned, -1 pad
    stop_words: Any          # [B, W, L] int32, right-aligned, -1 pad
    greedy: Any              # [B] bool
    beam_width: Any          # [B] int32
    len_penalty: Any         # [B] f32
    diversity_rate: Any      # [B] f32


def _pow2(n: int, lo: int) -> int:
    c = lo
    while c < n:
        c *= 2
    return c


def word_capacity_for(params_list, minimum: tuple[int, int] = (4, 4)) -> tuple[int, int]:
    """(words, length) capacity covering every request's bad/stop words: powers of two >= minimum."""
    nw, lw = 0, 0
    for p in params_list:
        if p is None:
            continue
        for k in _WORD_FIELDS:
            ws = getattr(p, k)
            nw = max(nw, len(ws))
            lw = max([lw] + [len(w) for w in ws])
    return _pow2(nw, minimum[0]), _pow2(lw, minimum[1])


def pack(params_list: Sequence[SamplingParams | None], num_slots: int, *, vocab: int,
         eos_id: int | None = None, word_capacity: tuple[int, int] | None = None,
         reset_capacity: int | None = None) -> SlotParams:
    """Requests -> SlotParams of numpy arrays; slot i gets params_list[i] (None / missing: neutral)."""
    params_list = list(params_list)
    if len(params_list) > num_slots:
        raise ValueError(f"{len(params_list)} requests for {num_slots} slots")
    W, L = word_capacity or word_capacity_for(params_list)
    need = word_capacity_for(params_list, (1, 1))
    if need[0] > W or need[1] > L:
        raise ValueError(f"word lists need capacity {need}, got word_capacity={(W, L)}")
    R = reset_capacity or _pow2(max([0] + [len(p.top_p_reset_ids) for p in params_list if p]), 4)
    B = num_slots
    out = dict(
        top_k=np.zeros(B, np.int32), top_p=np.zeros(B, np.float32), temperature=np.ones(B, np.float32),
        repetition_penalty=np.ones(B, np.float32), presence_penalty=np.zeros(B, np.float32),
        min_length=np.zeros(B, np.int32), end_id=np.full(B, -1, np.int32), seed=np.zeros((B, 2), np.uint32),
        top_p_decay=np.ones(B, np.float32), top_p_min=np.zeros(B, np.float32),
        top_p_reset_ids=np.full((B, R), -1, np.int32), bad_words=np.full((B, W, L), -1, np.int32),
        stop_words=np.full((B, W, L), -1, np.int32), greedy=np.ones(B, bool), beam_width=np.ones(B, np.int32),
        len_penalty=np.ones(B, np.float32), diversity_rate=np.zeros(B, np.float32))
    for i, p in enumerate(params_list):
        if p is None:
            continue
        p.verify(vocab, max_beam_width=max(p.beam_width, 1))
        out["top_k"][i] = min(p.top_k, vocab)
        # a positive top_p below float32's normal range would flush to 0 ("no filter") on the device
        out["top_p"][i] = max(p.top_p, MIN_TOP_P) if p.top_p > 0 else 0.0
        out["temperature"][i] = max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else 0.0
        out["repetition_penalty"][i] = p.repetition_penalty
        out["presence_penalty"][i] = p.presence_penalty
        out["min_length"][i] = p.min_length
        end = eos_id if p.end_id is MODEL_DEFAULT else p.end_id
        if end is not None and not 0 <= end < vocab:
            raise ValueError(f"end_id {end} is outside the vocabulary (size {vocab})")
        out["end_id"][i] = -1 if end is None else end
        out["seed"][i] = (p.random_seed >> 32, p.random_seed & 0xFFFFFFFF)
        out["top_p_decay"][i] = p.top_p_decay
        out["top_p_min"][i] = p.top_p_min
        out["top_p_reset_ids"][i, :len(p.top_p_reset_ids)] = p.top_p_reset_ids
        for k in _WORD_FIELDS:
            for j, w in enumerate(getattr(p, k)):
                out[k][i, j, L - len(w):] = w
        out["greedy"][i] = p.greedy
        out["beam_width"][i] = p.beam_width
        out["len_penalty"][i] = p.len_penalty
        out["diversity_rate"][i] = p.beam_search_diversity_rate
    return SlotParams(**out)


# ----------------------------------------------------------------------------------------------
# Device side: logits processing
# ----------------------------------------------------------------------------------------------


def _tail(seq, seq_len, n):
    """Last n valid tokens of each row: [B, n]; positions before the row start are -2 (never match)."""
    pos = seq_len[:, None] - n + jnp.arange(n)[None, :]                      # [B, n]
    t = jnp.take_along_axis(seq, jnp.clip(pos, 0, seq.shape[1] - 1), axis=1)
    return jnp.where(pos >= 0, t, -2)


def _word_match(words, tail):
    """words [..., W, n] right-aligned (-1 pad), tail [..., n] -> [..., W] every non-pad position matches
    (leading dims broadcast)."""
    return jnp.all((words == -1) | (words == tail[..., None, :]), axis=-1)


def _penalise(x, sp: SlotParams, seq, prompt_len, seq_len, gen_count):
    """x [B, V] f32 -> penalties, bad words and min_length applied (HF order), no temperature."""
    B, V = x.shape
    S = seq.shape[1]
    rows = jnp.arange(B)[:, None]
    pos = jnp.arange(S)[None, :]
    valid = pos < seq_len[:, None]                                             # [B, S]
    gen = valid & (pos >= prompt_len[:, None])
    tok = jnp.clip(seq, 0, V - 1)
    in_seq = jnp.zeros((B, V), bool).at[rows, tok].max(valid)
    in_gen = jnp.zeros((B, V), bool).at[rows, tok].max(gen)
    rp = sp.repetition_penalty[:, None]
    x = jnp.where(in_seq, jnp.where(x < 0, x * rp, x / rp), x)
    x = x - jnp.where(in_gen, sp.presence_penalty[:, None], 0.0)
    # bad words: ban a word's last token when its preceding tokens end the sequence
    bw = sp.bad_words                                                          # [B, W, L]
    Lw = bw.shape[-1]
    match = _word_match(bw[..., :-1], _tail(seq, seq_len, Lw - 1)) & (bw[..., -1] >= 0)
    ban = jnp.zeros((B, V), bool).at[rows, jnp.clip(bw[..., -1], 0, V - 1)].max(match)
    vocab = jnp.arange(V)[None, :]
    ban |= (vocab == sp.end_id[:, None]) & (gen_count < sp.min_length)[:, None]
    return jnp.where(ban, -jnp.inf, x)


def process_logits(logits, sp: SlotParams, seq, prompt_len, seq_len, gen_count, *, penalized: bool = True):
    """logits [B, V] -> processed [B, V] f32 for `sample`.

    seq [B, S] int32 holds prompt then generated ids: seq[b, :seq_len[b]] valid, the generated ones
    seq[b, prompt_len[b]:seq_len[b]]; gen_count [B] tokens generated so far. penalized=False (static):
    the caller knows that no row has a penalty, min_length or bad words (`SamplingParams.penalized`), so
    only the temperature applies (the same values: every processor is then the identity).
    """
    x = logits.astype(jnp.float32)
    if penalized:
        x = _penalise(x, sp, seq, prompt_len, seq_len, gen_count)
    return x / _temperature(sp)[:, None]


# Positive temperatures and top_p values are used from here up (`pack`, and the divisor below): x / 1e-30
# overflows float32 to inf (NaN probabilities), and 1e-38 or a top_p of 1e-45 are subnormals the device flushes
# to 0 (temperature 1, "no filter"); from here up they are as good as greedy, as asked.
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = 1e-6


def _temperature(sp: SlotParams):
    """[B] f32: the divisor of the logits (0 = greedy rows divide by 1: their argmax is unchanged)."""
    return jnp.where(sp.temperature > 0, jnp.maximum(sp.temperature, MIN_TEMPERATURE), 1.0)


def beam_log_probs(logits, sp: SlotParams, seq, prompt_len, seq_len, gen_count):
    """Beam search's per-row scores: log_softmax(logits / temperature) (FT's beam search divides the logits by
    the temperature before its softmax; temperature 0 is taken as 1), then, as HF, the processors (penalties,
    bad words, min_length) on the log probs, not renormalised. [B, V] f32."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) / _temperature(sp)[:, None], axis=-1)
    return _penalise(lp, sp, seq, prompt_len, seq_len, gen_count)


# ----------------------------------------------------------------------------------------------
# Device side: sampling
# ----------------------------------------------------------------------------------------------


def _row_keys(sp: SlotParams, gen_count):
    """[B, 2] uint32: threefry(random_seed, gen_count) — the row's key for this step."""
    def one(seed, step):
        k = jax.random.wrap_key_data(seed.astype(jnp.uint32), impl="threefry2x32")
        return jax.random.key_data(jax.random.fold_in(k, step.astype(jnp.uint32)))
    return jax.vmap(one)(sp.seed, gen_count)


def _mix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _gumbel(keys, ids):
    """keys [B, 2] uint32, ids [B, N] int32 -> Gumbel noise [B, N], a function of (key, id) only.

    A cheap integer hash (two rounds of a 32-bit avalanche mix keyed by the row's threefry output)
    rather than threefry per element: a [B, V] draw stays a memory-bound elementwise pass."""
    ids = ids.astype(jnp.uint32)
    h = _mix32(ids * jnp.uint32(0x9E3779B9) ^ keys[:, :1])
    h = _mix32(h ^ keys[:, 1:])
    u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24) + (0.5 / 2**24)            # (0, 1)
    return -jnp.log(-jnp.log(u))


def _thresholds(vals, lse, top_k, p, use_p, vocab):
    """vals [B, C] descending logits (the C best of V) -> (thr [B], complete [B]).

    Kept set = {x >= thr}. complete: every token outside the C candidates is certainly dropped.
    """
    B, C = vals.shape
    neg = jnp.float32(-jnp.inf)
    k_eff = jnp.clip(jnp.where(top_k > 0, top_k, C), 1, C)
    thr_k = jnp.where(top_k > 0, jnp.take_along_axis(vals, (k_eff - 1)[:, None], 1)[:, 0], neg)
    in_k = vals >= thr_k[:, None]                                                 # a prefix
    lse_k = jnp.where(top_k > 0, jax.nn.logsumexp(jnp.where(in_k, vals, neg), axis=-1), lse)
    q = jnp.where(in_k, jnp.exp(vals - lse_k[:, None]), 0.0)
    excl = jnp.cumsum(q, axis=-1) - q
    keep = in_k & (excl < p[:, None])
    last = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
    thr_p = jnp.take_along_axis(vals, last[:, None], 1)[:, 0]
    thr = jnp.where(use_p, jnp.maximum(thr_p, thr_k), thr_k)
    bottom = vals[:, -1]
    complete = (C >= vocab) | ((thr > bottom) & ((top_k == 0) | (thr_k > bottom)) & (top_k < C))
    return thr, complete


def sample(logits, sp: SlotParams, gen_count, top_p_current=None, *, max_top_k: int = 16, sampled: bool = True):
    """Processed logits [B, V] -> (tokens [B] int32, logprobs [B] f32).

    Greedy rows: argmax (first index on ties). Others: top-k, then top-p on the renormalised top-k
    softmax (with the current, possibly decayed p), Gumbel-max draw keyed on (random_seed, gen_count)
    only. logprob = log_softmax(logits)[token] (see the module docstring).
    `max_top_k` (static) sizes the fast path's candidate set (`lax.top_k(x, max_top_k)`; on XLA:GPU
    k <= 16 has a dedicated kernel, larger k is a full sort): rows whose kept set may reach beyond
    the candidates (top_k >= max_top_k, a nucleus wider than that, boundary ties) take a full sort.
    A batch of greedy rows only costs the argmax and logsumexp.
    """
    x = logits.astype(jnp.float32)
    B, V = x.shape
    p_cur = sp.top_p if top_p_current is None else top_p_current
    use_p = (sp.top_p > 0) & (p_cur < 1.0)
    lse = jax.nn.logsumexp(x, axis=-1)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    keys = _row_keys(sp, gen_count)

    C = max(1, min(max_top_k, V))

    def draw(_):
        vals, idx = jax.lax.top_k(x, C)
        thr, complete = _thresholds(vals, lse, sp.top_k, p_cur, use_p, V)
        g = _gumbel(keys, idx)
        j = jnp.argmax(jnp.where(vals >= thr[:, None], vals + g, -jnp.inf), axis=-1)
        tok_fast = jnp.take_along_axis(idx, j[:, None], 1)[:, 0].astype(jnp.int32)
        need_full = ~complete & ~sp.greedy

        def full(_):
            svals = -jnp.sort(-x, axis=-1)
            thr_f, _ = _thresholds(svals, lse, sp.top_k, p_cur, use_p, V)
            gf = _gumbel(keys, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V)))
            tok_f = jnp.argmax(jnp.where(x >= thr_f[:, None], x + gf, -jnp.inf), axis=-1).astype(jnp.int32)
            return jnp.where(need_full, tok_f, tok_fast)

        if C >= V:
            return tok_fast
        return jax.lax.cond(jnp.any(need_full), full, lambda _: tok_fast, None)

    # Whether any row samples is the caller's (static) knowledge: a `lax.cond` on `all(greedy)` would
    # cost a host round trip per step on XLA:GPU (a conditional's predicate goes to the host).
    tok = jnp.where(sp.greedy, greedy_tok, draw(None)) if sampled else greedy_tok
    logprob = jnp.take_along_axis(x, tok[:, None], 1)[:, 0] - lse
    return tok, logprob


def filter_logits(logits, sp: SlotParams, top_p_current=None):
    """Reference view of the kept set: processed logits [B, V] with -inf outside the top-k / top-p
    set that `sample` draws from (what HF's TopK + TopP warpers return). Full sort; for tests/debug."""
    x = logits.astype(jnp.float32)
    p_cur = sp.top_p if top_p_current is None else top_p_current
    use_p = (sp.top_p > 0) & (p_cur < 1.0)
    thr, _ = _thresholds(-jnp.sort(-x, axis=-1), jax.nn.logsumexp(x, axis=-1), sp.top_k, p_cur, use_p, x.shape[1])
    thr = jnp.where(sp.greedy, jnp.max(x, axis=-1), thr)
    return jnp.where(x >= thr[:, None], x, -jnp.inf)


def next_top_p(top_p_current, tokens, sp: SlotParams):
    """FT's factual-nucleus update after a step: reset to top_p on a reset id, else decay to the floor."""
    reset = jnp.any(sp.top_p_reset_ids == tokens[:, None], axis=-1)
    decayed = jnp.maximum(top_p_current * sp.top_p_decay, sp.top_p_min)
    return jnp.where(reset, sp.top_p, jnp.where(sp.top_p_decay < 1.0, decayed, top_p_current))


def stop_hit(seq, seq_len, sp: SlotParams, prompt_len=None):
    """[B] bool: seq[:seq_len] ends with one of the row's stop words (and, with prompt_len, at least
    one token has been generated — the stop word may start inside the prompt)."""
    sw = sp.stop_words
    hit = jnp.any(_word_match(sw, _tail(seq, seq_len, sw.shape[-1])) & (sw[..., -1] >= 0), axis=-1)
    if prompt_len is not None:
        hit &= seq_len > prompt_len
    return hit


def stop_hit_candidates(seq, seq_len, rows, tokens, stop_words):
    """[G, C] bool: row rows[g, c]'s sequence seq[:seq_len] followed by tokens[g, c] ends with one of
    stop_words [G, n, L] (right-aligned, -1 pad): the stop words of beam search's candidates."""
    L = stop_words.shape[-1]
    G, C = rows.shape
    prev = _tail(seq, seq_len, L - 1)[rows.reshape(-1)].reshape(G, C, L - 1)      # [G, C, L - 1]
    tail = jnp.concatenate([prev, tokens[:, :, None]], axis=-1)                   # [G, C, L]
    sw = stop_words[:, None]                                                      # [G, 1, n, L]
    return jnp.any(_word_match(sw, tail) & (sw[..., -1] >= 0), axis=-1)


# ----------------------------------------------------------------------------------------------
# Device side: beam search (HF transformers 5.x `_beam_search`, early_stopping=False)
# ----------------------------------------------------------------------------------------------


class BeamState(NamedTuple):
    """G groups (requests) x W beams (W = the engine's max beam width), T = max new tokens.
    Beams j >= the group's beam_width are disabled (score -inf). fin_* are the finished hypotheses,
    best first; fin_score = fin_cum / fin_len ** len_penalty (NEG = empty)."""

    cum: Any            # [G, W] f32 running score (sum of processed log probs, + diversity bonus)
    tokens: Any         # [G, W, T] int32 running beams' generated tokens
    logprobs: Any       # [G, W, T] f32 their per-token processed log probs
    fin_tokens: Any     # [G, W, T] int32
    fin_logprobs: Any   # [G, W, T] f32
    fin_score: Any      # [G, W] f32
    fin_cum: Any        # [G, W] f32
    fin_len: Any        # [G, W] int32 (includes end_id)
    fin_mask: Any       # [G, W] bool
    improvable: Any     # [G] bool (HF is_early_stop_heuristic_unsatisfied)
    done: Any           # [G] bool
    step: Any           # [G] int32 tokens generated so far


def beam_init(num_groups: int, max_beam_width: int, max_new_tokens: int, beam_width=None) -> BeamState:
    G, W, T = num_groups, max_beam_width, max_new_tokens
    bw = jnp.full((G,), W, jnp.int32) if beam_width is None else jnp.asarray(beam_width, jnp.int32).reshape(G)
    j = jnp.arange(W)[None, :]
    live = j < bw[:, None]
    return BeamState(
        cum=jnp.where(j == 0, 0.0, jnp.where(live, NEG, -jnp.inf)).astype(jnp.float32),
        tokens=jnp.zeros((G, W, T), jnp.int32), logprobs=jnp.zeros((G, W, T), jnp.float32),
        fin_tokens=jnp.zeros((G, W, T), jnp.int32), fin_logprobs=jnp.zeros((G, W, T), jnp.float32),
        fin_score=jnp.where(live, NEG, -jnp.inf).astype(jnp.float32), fin_cum=jnp.zeros((G, W), jnp.float32),
        fin_len=jnp.zeros((G, W), jnp.int32), fin_mask=jnp.zeros((G, W), bool),
        improvable=jnp.ones((G,), bool), done=jnp.zeros((G,), bool), step=jnp.zeros((G,), jnp.int32))


def beam_reset(state: BeamState, group, beam_width) -> BeamState:
    """Fresh state for one group (a new request in that slot group); jit-friendly."""
    W, T = state.cum.shape[1], state.tokens.shape[2]
    fresh = beam_init(1, W, T, jnp.reshape(beam_width, (1,)))
    return jax.tree.map(lambda s, f: s.at[group].set(f[0]), state, fresh)


def _gather(a, idx):
    """a [G, N, ...], idx [G, M] -> [G, M, ...]."""
    return jax.vmap(lambda r, i: r[i])(a, idx)


def beam_step(state: BeamState, logprobs, *, end_id, len_penalty, diversity_rate, beam_width,
              max_new_tokens, stops=None):
    """One beam-search step for G groups.

    logprobs [G, W, V] f32: `beam_log_probs` of each running beam (rows g*W + j). end_id [G] (-1 none),
    len_penalty / diversity_rate [G] f32, beam_width [G] int32 (<= W), max_new_tokens [G] int32.
    stops (optional): (parent [G, C] int32, token [G, C] int32) -> [G, C] bool, whether candidate beam
    `parent` + `token` ends with a stop word; such a candidate finishes like one that hits end_id (its
    last token kept).
    Returns (state, parent [G, W] int32, tokens [G, W] int32): the engine reorders its per-row state
    (K/V cache, seq) so that new beam j continues old beam parent[g, j], then feeds tokens[g, j].
    Groups already done are left unchanged (parent = identity).
    """
    G, W, V = logprobs.shape
    T = state.tokens.shape[2]
    C = min(2 * W, V)
    f32 = jnp.float32
    step = state.step
    bw = beam_width.astype(jnp.int32)
    # candidates: the 2W best tokens of each parent, FT diversity bonus by rank, then the 2W best overall
    cand_lp, cand_tok = jax.lax.top_k(logprobs.astype(f32), C)                 # [G, W, C]
    score = state.cum[:, :, None] + cand_lp + diversity_rate.astype(f32)[:, None, None] * jnp.arange(C, dtype=f32)
    top_s, top_i = jax.lax.top_k(score.reshape(G, W * C), 2 * W)               # [G, 2W]
    c_parent = (top_i // C).astype(jnp.int32)
    c_tok = jnp.take_along_axis(cand_tok.reshape(G, W * C), top_i, 1).astype(jnp.int32)
    c_lp = jnp.take_along_axis(cand_lp.reshape(G, W * C), top_i, 1)
    rank = jnp.arange(2 * W)[None, :]
    valid = rank < 2 * bw[:, None]
    hits = (c_tok == end_id[:, None]) | ((step + 1) >= max_new_tokens)[:, None]
    if stops is not None:
        hits |= stops(c_parent, c_tok)
    # candidate sequences (generated part)
    t_pos = jnp.arange(T)[None, None, :]
    c_seq = jnp.where(t_pos == step[:, None, None], c_tok[:, :, None], _gather(state.tokens, c_parent))
    c_lps = jnp.where(t_pos == step[:, None, None], c_lp[:, :, None], _gather(state.logprobs, c_parent))

    # running beams for the next step: best w candidates that did not finish
    run_s = jnp.where(valid, top_s + jnp.where(hits, NEG, 0.0), -jnp.inf)
    sel_s, sel = jax.lax.top_k(run_s, W)                                       # [G, W]
    live = jnp.arange(W)[None, :] < bw[:, None]
    new_cum = jnp.where(live, sel_s, -jnp.inf)
    parent = _gather(c_parent, sel)
    tokens = _gather(c_tok, sel)
    new_tokens, new_lps = _gather(c_seq, sel), _gather(c_lps, sel)

    # finished hypotheses: those among the top w candidates that hit end_id / the length limit
    did = hits & (rank < bw[:, None])
    length = (step + 1).astype(f32)
    fin_c = top_s / (length ** len_penalty.astype(f32))[:, None]
    fin_c = fin_c + jnp.where(state.improvable, 0.0, NEG)[:, None] + jnp.where(did, 0.0, NEG)
    fin_c = jnp.where(valid, fin_c, -jnp.inf)
    m_score = jnp.concatenate([state.fin_score, fin_c], 1)                      # [G, 3W]
    _, m_i = jax.lax.top_k(m_score, W)
    m_score = jnp.where(live, _gather(m_score, m_i), -jnp.inf)
    pick = lambda old, new: _gather(jnp.concatenate([old, new], 1), m_i)  # noqa: E731
    fin_tokens = pick(state.fin_tokens, c_seq)
    fin_lps = pick(state.fin_logprobs, c_lps)
    fin_cum = pick(state.fin_cum, top_s)
    fin_len = pick(state.fin_len, jnp.broadcast_to((step + 1)[:, None], top_s.shape).astype(jnp.int32))
    fin_mask = pick(state.fin_mask, did) & live

    # HF's early-stop heuristic (early_stopping=False): can the best running beam still beat the worst finished?
    best = new_cum[:, 0] / length ** len_penalty.astype(f32)
    worst = jnp.min(jnp.where(live, m_score, jnp.inf), axis=1)
    worst_j = jnp.where(fin_mask, worst[:, None], NEG)
    improvable = state.improvable & jnp.any(live & (best[:, None] > worst_j), axis=1)
    done = state.done | ~improvable | jnp.all(hits | ~valid, axis=1)

    new = BeamState(new_cum, new_tokens, new_lps, fin_tokens, fin_lps, m_score, fin_cum, fin_len, fin_mask,
                    improvable, done, step + 1)
    keep = state.done

    def sel_old(o, n):
        return jnp.where(keep.reshape((G,) + (1,) * (o.ndim - 1)), o, n)
    out = jax.tree.map(sel_old, state, new)
    ident = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (G, W))
    parent = jnp.where(keep[:, None], ident, parent)
    last = jnp.take_along_axis(state.tokens, jnp.clip(step - 1, 0, T - 1)[:, None, None], 2)[..., 0]
    tokens = jnp.where(keep[:, None], last, tokens)
    return out, parent, tokens
