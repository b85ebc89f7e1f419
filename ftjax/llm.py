"""The library face: `ftjax.load(...)` returns an `LLM` with `generate` and `logits`."""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import numpy as np

from ftjax.config import ModelConfig, default_config
from ftjax.engine import Engine, EngineConfig, bucket, int_row
from ftjax.sampling import MODEL_DEFAULT, SamplingParams, params_for_batch

log = logging.getLogger("ftjax")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]                 # generated ids per prompt (beam 0), end_id included if generated
    sequence_lengths: list[int]             # len(tokens[i])
    cum_log_probs: list[float] | None = None
    output_log_probs: list[list[float]] | None = None
    beams: list[list[list[int]]] | None = None


def load(path: str | None = None, dtype: str = "bfloat16", max_batch_size: int = 8, max_seq_len: int | None = None,
         attention: str = "auto", tensor_parallel: int = 1, pipeline_parallel: int = 1,
         quantize: str | None = None, max_beam_width: int = 4) -> "LLM":
    """Load a checkpoint (HF dir, Megatron checkpoint, FT-converted dir or ftjax dir); None -> the
    embedded default model (a small GPT with seeded random weights). max_batch_size="auto": as many
    slots as the device memory left after the weights holds (8 where the backend reports no memory). `max_beam_width` (an ftjax
    addition) is the widest beam search a request may ask for; a beam request takes beam_width rows."""
    for name, v in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
    mesh = None
    if tensor_parallel * pipeline_parallel > 1 or _process_count() > 1:   # ftjax/sharding: T x P mesh
        from ftjax.sharding.mesh import make_mesh

        mesh = make_mesh(tensor_parallel, pipeline_parallel)
    if quantize is not None:
        from ftjax.quantize import check_mode

        check_mode(quantize)
    if path is None:
        from ftjax.models import gpt

        cfg = default_config()
        log.warning("ftjax: no checkpoint given; using the embedded default model (%d layers, hidden %d, "
                    "vocab %d) with seeded random weights", cfg.num_layers, cfg.hidden, cfg.vocab_size)
        params = gpt.init_params(cfg, seed=0)
    else:
        from ftjax.checkpoint import load_checkpoint

        loaded = None
        if mesh is not None and quantize is None:   # ftjax (orbax) dir: each process reads only its shards
            from ftjax.sharding.layout import load_sharded

            loaded = load_sharded(path, mesh)
        cfg, params = loaded if loaded is not None else load_checkpoint(path)
    if quantize is not None:  # on the host (numpy), before the Engine puts anything on the device
        from ftjax.quantize import quantize_params

        params = quantize_params(params, cfg, mode=quantize, delete_source=path is None)
    return LLM(cfg, params, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
               attention=attention, max_beam_width=_beam_cap(max_beam_width, max_batch_size), mesh=mesh)


def _beam_cap(max_beam_width, max_batch_size):
    """max_beam_width no wider than the slots (with 'auto' slots the engine caps it once it knows them)."""
    if isinstance(max_batch_size, (int, np.integer)) and not isinstance(max_batch_size, bool):
        return min(max_beam_width, max_batch_size)
    return max_beam_width


def _process_count() -> int:
    import jax

    return jax.process_count()


class LLM:
    def __init__(self, cfg: ModelConfig, params, *, dtype="bfloat16", max_batch_size=8, max_seq_len=None,
                 attention="auto", max_beam_width=None, mesh=None):
        self.cfg = cfg
        mbw = _beam_cap(4, max_batch_size) if max_beam_width is None else max_beam_width
        self.engine = Engine(cfg, params, EngineConfig(max_batch_size, cfg.max_positions if max_seq_len is None else max_seq_len,
                                                       dtype, attention, mbw), mesh=mesh)
        self._state = None

    @property
    def max_batch_size(self) -> int:
        return self.engine.slots

    @property
    def max_seq_len(self) -> int:
        return self.engine.S

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 16, *, params=None,
                 progress=None, **decoding) -> GenerationResult:
        """Decodes `prompts` (CONTRACTS.md). max_new_tokens: one int, or one per prompt. When the prompts' rows
        (beam_width each) fit the slots they run as one batch; otherwise continuously: a prompt takes the
        slots of one that finished, so short and early-ending rows do not hold a batch back. Tokens are the
        same either way (each request samples from its own seed). progress(prompts done, generated tokens),
        when given, is called as prompts finish."""
        prompts = _as_prompts(prompts)
        max_new = _max_new_list(max_new_tokens, len(prompts))
        for i, p in enumerate(prompts):
            self.engine.check_prompt(p, max_new[i], field=f"prompts[{i}]")
        plist = self.sampling_params(len(prompts), params, **decoding)
        want_lp = any(p.return_log_probs for p in plist)
        any_beam = any(p.beam_width > 1 for p in plist)
        if self._state is None:
            self._state = self.engine.init_state()
        try:
            if sum(p.beam_width for p in plist) <= self.engine.slots:
                got = self._run_batch(prompts, max_new, plist, progress)
            else:
                got = self._run_continuous(prompts, max_new, plist, progress)
        except BaseException:
            # an error or Ctrl-C after a call took the (donated) state: the next call starts from a fresh one
            self._state = None
            self.engine.release_slots(range(self.engine.slots))
            raise
        out = GenerationResult(tokens=[], sequence_lengths=[], cum_log_probs=[], output_log_probs=[],
                               beams=[] if any_beam else None)
        for toks, lp, beams in got:
            out.tokens.append(toks)
            out.sequence_lengths.append(len(toks))
            out.output_log_probs.append(lp)
            out.cum_log_probs.append(float(sum(lp)))
            if any_beam:
                out.beams.append(beams)
        if not want_lp:
            out.cum_log_probs = out.output_log_probs = None
        return out

    def _steps_for(self, p: SamplingParams, max_new: int) -> int:
        """Decode steps a request needs after its admit: a sampled GPT row has its first id from prefill."""
        return max_new - 1 if self.engine.family.samples_at_prefill and p.beam_width == 1 else max_new

    def _run_batch(self, prompts, max_new, plist, progress=None) -> list:
        """Every request at once: one admit, one generate call of as many steps as the longest needs."""
        slots, used = [], 0
        for p in plist:
            w = p.beam_width
            slots.append(used if w == 1 else list(range(used, used + w)))
            used += w
        idx = list(range(len(prompts)))
        st = self.engine.prefill_insert(self._state, prompts, slots, max_new, plist)
        st, _ = self.engine.generate_steps(st, max(self._steps_for(p, m) for p, m in zip(plist, max_new)))
        self._state = st
        got = self._collect(st, idx, slots, plist)
        # every row has ended: the next calls' steps need not run its sampling or processors
        self.engine.release_slots([x for sl in slots for x in _slot_list(sl)])
        if progress is not None:
            progress(len(idx), sum(len(got[i][0]) for i in idx))
        return [got[i] for i in idx]

    def _run_continuous(self, prompts, max_new, plist, progress) -> list:
        """More rows than slots: admit into free slots, run up to CHUNK steps, read which rows are done (one
        small read per call), collect the finished requests and free their slots; until all are done."""
        eng = self.engine
        n = len(prompts)
        got: list = [None] * n
        free = list(range(eng.slots))
        live: dict[int, list] = {}    # request -> its slots
        left: dict[int, int] = {}     # request -> decode steps it may still need
        nxt, done_n, done_tok = 0, 0, 0
        while nxt < n or live:
            adm, adm_slots = [], []
            while nxt < n and plist[nxt].beam_width <= len(free):
                w = plist[nxt].beam_width
                sl, free = free[:w], free[w:]
                adm.append(nxt)
                adm_slots.append(sl[0] if w == 1 else sl)
                live[nxt], left[nxt] = sl, self._steps_for(plist[nxt], max_new[nxt])
                nxt += 1
            if adm:
                self._state = eng.prefill_insert(self._state, [prompts[i] for i in adm], adm_slots,
                                                 [max_new[i] for i in adm], [plist[i] for i in adm])
            k = min(eng.CHUNK, max(left.values()))
            if k > 0:
                self._state, _ = eng.generate_steps(self._state, k)
            for i in live:
                left[i] = max(0, left[i] - k)
            done = np.asarray(jax.device_get(self._state.done))
            fin = [i for i, sl in live.items() if done[sl[0]]]   # a beam group's head says for the group
            if not fin:
                if k == 0 and not adm:   # cannot happen: a row is done once it has run its steps
                    raise RuntimeError(f"requests {sorted(live)}: not done after max_new_tokens steps")
                continue
            shown = {i: (live[i][0] if plist[i].beam_width == 1 else live[i]) for i in fin}
            got_now = self._collect(self._state, fin, [shown[i] for i in fin], plist)
            for i in fin:
                got[i] = got_now[i]
                free.extend(live.pop(i))
                del left[i]
                done_n += 1
                done_tok += len(got[i][0])
            eng.release_slots([x for i in fin for x in _slot_list(shown[i])])
            free.sort()
            if progress is not None:
                progress(done_n, done_tok)
        return got

    def _collect(self, st, idx, slots, plist) -> dict:
        """Requests idx (in slots) -> {i: (tokens, log probs, beams)}. One jax.device_get: every copy is
        started before the first is waited on (each np.asarray of a device array on its own is a round trip
        of ~0.5 ms on a GPU)."""
        beam = None
        if st.beam is not None and any(plist[j].beam_width > 1 for j in idx):
            beam = {k: getattr(st.beam, k) for k in ("fin_tokens", "fin_logprobs", "fin_len", "fin_mask")}
        host, beam = jax.device_get(({k: getattr(st, k) for k in ("seq", "seq_len", "prompt_len", "logprobs")},
                                     beam))
        out = {}
        for j, sl in zip(idx, slots):
            if plist[j].beam_width > 1:
                g = sl[0]
                hyps = [(beam["fin_tokens"][g, b, :n].tolist(), beam["fin_logprobs"][g, b, :n].astype(float).tolist())
                        for b in range(plist[j].beam_width)
                        if beam["fin_mask"][g, b] and (n := int(beam["fin_len"][g, b])) > 0]
                toks, lp = hyps[0] if hyps else ([], [])
                out[j] = (toks, lp, [h[0] for h in hyps])
            else:
                s0, e0 = host["prompt_len"][sl], host["seq_len"][sl]
                toks = host["seq"][sl, s0:e0].tolist()
                out[j] = (toks, host["logprobs"][sl, s0:e0].astype(float).tolist(), [toks])
        return out

    def sampling_params(self, n: int, params=None, **decoding) -> list[SamplingParams]:
        """CONTRACTS.md's keyword expansion, with the model's defaults resolved (end_id -> eos) and
        every value verified against the model; ValueError names the field."""
        out = []
        for p in params_for_batch(n, params, **decoding):
            if p.end_id is MODEL_DEFAULT:
                p = p.replace(end_id=self.cfg.eos_id)
            out.append(p.verify(self.cfg.vocab, self.engine.max_beam_width))
        return out

    def logits(self, ids: Sequence[Sequence[int]], decoder_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """GPT: logits(ids) -> [batch, len, vocab] float32 (rows right-padded to the longest).
        T5: logits(encoder_ids, decoder_ids) -> [batch, dec_len, vocab] (teacher forcing)."""
        is_t5 = not self.engine.family.samples_at_prefill
        if is_t5 != (decoder_ids is not None):
            raise ValueError("decoder_ids: required for an encoder-decoder model, and only for one")
        enc, enc_len, longest = self._pad(ids, "ids")
        if not is_t5:
            out = np.asarray(self.engine.logits(enc, enc_len))
        else:
            dec, dec_len, longest = self._pad(decoder_ids, "decoder_ids")
            if dec.shape[0] != enc.shape[0]:
                raise ValueError(f"decoder_ids: {dec.shape[0]} rows for {enc.shape[0]} encoder rows")
            out = np.asarray(self.engine.logits(enc, enc_len, dec, dec_len))
        return out[:, :longest, : self.cfg.vocab].astype(np.float32)   # without a padded vocabulary's rows

    def _pad(self, ids, field):
        prompts = _as_prompts(ids, field)
        for i, p in enumerate(prompts):
            self.engine.check_prompt(p, 0, field=f"{field}[{i}]")
        n, longest = len(prompts), max(len(p) for p in prompts)
        T = bucket(longest, 16, self.engine.S)
        tokens = np.zeros((n, T), np.int32)
        lengths = np.zeros((n,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        return tokens, lengths, longest


def _slot_list(sl) -> list:
    return [sl] if np.ndim(sl) == 0 else list(sl)


def _max_new_list(max_new_tokens, n: int) -> list[int]:
    """max_new_tokens (an int, or one per prompt) -> n positive ints; ValueError names the keyword."""
    one = lambda v: (not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v > 0)  # noqa: E731
    if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        vals = list(max_new_tokens)
        if len(vals) != n:
            raise ValueError(f"max_new_tokens: {len(vals)} values for {n} prompts")
        bad = next((v for v in vals if not one(v)), None)
        if bad is not None:
            raise ValueError(f"max_new_tokens: must be positive integers, got {bad!r}")
        return [int(v) for v in vals]
    if not one(max_new_tokens):
        raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    return [int(max_new_tokens)] * n


def _as_prompts(prompts, field: str = "prompts") -> list:
    """The prompts as a list of 1-D integer numpy arrays (one conversion per row: a Python loop over every
    token id costs ~5 ms for 64 prompts of 512 tokens, in the request's latency). Rows numpy cannot take
    as plain integers (floats, strings, ints beyond int64) go the per-id way, whose errors name the row."""
    if isinstance(prompts, np.ndarray):
        prompts = list(prompts) if prompts.ndim == 2 and prompts.dtype.kind in "iu" else prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"{field}: expected a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple, np.ndarray)):
            raise ValueError(f"{field}[{i}]: expected a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"{field}[{i}]: empty prompt")
        a = int_row(p)
        if a is not None:
            out.append(a)
            continue
        if isinstance(p, np.ndarray):
            p = p.tolist()
        try:
            row = [int(t) for t in p]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{field}[{i}]: token ids must be integers ({e})") from None
        frac = next((t for t, v in zip(p, row) if v != t), None)   # 2.5 or "7": not an id (2.0 is)
        if frac is not None:
            raise ValueError(f"{field}[{i}]: token ids must be integers, got {frac!r}")
        out.append(row)
    return out
