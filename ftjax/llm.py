"""The library face: `ftjax.load(...)` returns an `LLM` with `generate` and `logits`."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from ftjax.config import ModelConfig, default_config
from ftjax.engine import Engine, EngineConfig, bucket
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
         quantize: str | None = None) -> "LLM":
    """Load a checkpoint (HF dir, Megatron checkpoint, FT-converted dir or ftjax dir); None -> the
    embedded default model (a small GPT with seeded random weights)."""
    if tensor_parallel != 1 or pipeline_parallel != 1:
        raise ValueError(f"tensor_parallel={tensor_parallel}, pipeline_parallel={pipeline_parallel}: "
                         "this build runs on one device (tensor_parallel=1, pipeline_parallel=1)")
    if quantize is not None:
        raise ValueError(f"quantize: {quantize!r} is not available in this build (weight-only int8 not landed)")
    if path is None:
        from ftjax.models import gpt

        cfg = default_config()
        log.warning("ftjax: no checkpoint given; using the embedded default model (%d layers, hidden %d, "
                    "vocab %d) with seeded random weights", cfg.num_layers, cfg.hidden, cfg.vocab_size)
        params = gpt.init_params(cfg, seed=0)
    else:
        from ftjax.checkpoint import load_checkpoint

        cfg, params = load_checkpoint(path)
    return LLM(cfg, params, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
               attention=attention)


class LLM:
    def __init__(self, cfg: ModelConfig, params, *, dtype="bfloat16", max_batch_size=8, max_seq_len=None,
                 attention="auto"):
        self.cfg = cfg
        self.engine = Engine(cfg, params, EngineConfig(max_batch_size, max_seq_len or cfg.max_positions,
                                                       dtype, attention))
        self._state = None

    @property
    def max_batch_size(self) -> int:
        return self.engine.B

    @property
    def max_seq_len(self) -> int:
        return self.engine.S

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, *, params=None,
                 **decoding) -> GenerationResult:
        prompts = _as_prompts(prompts)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
        for i, p in enumerate(prompts):
            self.engine.check_prompt(p, int(max_new_tokens), field=f"prompts[{i}]")
        plist = self.sampling_params(len(prompts), params, **decoding)
        out = GenerationResult(tokens=[], sequence_lengths=[], cum_log_probs=[], output_log_probs=[])
        want_lp = any(p.return_log_probs for p in plist)
        B = self.engine.B
        for start in range(0, len(prompts), B):
            chunk = prompts[start:start + B]
            cp = plist[start:start + B]
            if self._state is None:
                self._state = self.engine.init_state()
            st = self.engine.prefill_insert(self._state, chunk, list(range(len(chunk))),
                                            [int(max_new_tokens)] * len(chunk), cp)
            st, _ = self.engine.generate_steps(st, int(max_new_tokens))
            self._state = st
            seq, seq_len, plen, lps = (np.asarray(a) for a in (st.seq, st.seq_len, st.prompt_len, st.logprobs))
            for i in range(len(chunk)):
                toks = seq[i, plen[i]:seq_len[i]].tolist()
                out.tokens.append(toks)
                out.sequence_lengths.append(len(toks))
                lp = lps[i, plen[i]:seq_len[i]].astype(float).tolist()
                out.output_log_probs.append(lp)
                out.cum_log_probs.append(float(sum(lp)))
        if not want_lp:
            out.cum_log_probs = out.output_log_probs = None
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

    def logits(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Full-sequence logits [batch, len, vocab] float32 (prompts right-padded to the longest)."""
        prompts = _as_prompts(ids)
        for i, p in enumerate(prompts):
            self.engine.check_prompt(p, 0, field=f"ids[{i}]")
        n, longest = len(prompts), max(len(p) for p in prompts)
        T = bucket(longest, 16, self.engine.S)
        tokens = np.zeros((n, T), np.int32)
        lengths = np.zeros((n,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        out = np.asarray(self.engine.logits(tokens, lengths))[:, :longest, : self.cfg.vocab_size]
        return out.astype(np.float32)


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if not isinstance(p, (list, tuple)):
            raise ValueError(f"prompts[{i}]: expected a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt")
        try:
            out.append([int(t) for t in p])
        except (TypeError, ValueError) as e:
            raise ValueError(f"prompts[{i}]: token ids must be integers ({e})") from None
    return out
