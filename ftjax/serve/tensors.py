"""FasterTransformer's tensor names <-> requests: decoding, validation and encoding of Triton tensors.

Inputs come from `raw_input_contents` (little-endian bytes, in the order of the inputs that carry no
typed `contents`) or from the typed `contents` fields. Every error is a `TensorError` whose message
names the tensor; the server answers it with INVALID_ARGUMENT.

GPT (FT's `all_models/gpt/fastertransformer/config.pbtxt`), per request of `batch` rows:
    input_ids           UINT32 [batch, len]      right-padded prompts
    input_lengths       UINT32 [batch, 1]        prompt lengths
    request_output_len  UINT32 [batch, 1]        tokens to generate
    optional, [batch, 1] (or [1, 1] for all rows): runtime_top_k UINT32, runtime_top_p FP32,
        beam_width UINT32, temperature FP32, len_penalty FP32, repetition_penalty FP32,
        presence_penalty FP32, min_length UINT32, random_seed UINT64, start_id UINT32, end_id UINT32,
        is_return_log_probs BOOL, beam_search_diversity_rate FP32, top_p_decay FP32, top_p_min FP32,
        top_p_reset_ids UINT32
    optional word lists: stop_words_list, bad_words_list INT32 [batch, 2, L] (FT's encoding)
Outputs (raw_output_contents): output_ids UINT32 [batch, beam, len] (prompt then generated, 0-padded),
sequence_length UINT32 [batch, beam], cum_log_probs FP32 [batch, beam], output_log_probs FP32
[batch, beam, generated] (the last two when is_return_log_probs).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Triton datatype string -> (numpy dtype, typed-contents field)
DTYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "INT8": (np.int8, "int_contents"), "INT16": (np.int16, "int_contents"), "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "UINT8": (np.uint8, "uint_contents"), "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"), "UINT64": (np.uint64, "uint64_contents"),
    "FP16": (np.float16, None), "BF16": (None, None), "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"), "BYTES": (None, "bytes_contents"),
}


class TensorError(ValueError):
    """A bad input tensor; the message names it. -> INVALID_ARGUMENT."""


# name -> (Triton dtype, SamplingParams field or None, required)
GPT_REQUIRED = {"input_ids": "UINT32", "input_lengths": "UINT32", "request_output_len": "UINT32"}
GPT_SCALARS: dict[str, tuple[str, str]] = {
    "runtime_top_k": ("UINT32", "top_k"),
    "runtime_top_p": ("FP32", "top_p"),
    "beam_width": ("UINT32", "beam_width"),
    "temperature": ("FP32", "temperature"),
    "len_penalty": ("FP32", "len_penalty"),
    "repetition_penalty": ("FP32", "repetition_penalty"),
    "presence_penalty": ("FP32", "presence_penalty"),
    "min_length": ("UINT32", "min_length"),
    "random_seed": ("UINT64", "random_seed"),
    "start_id": ("UINT32", "start_id"),
    "end_id": ("UINT32", "end_id"),
    "is_return_log_probs": ("BOOL", "return_log_probs"),
    "beam_search_diversity_rate": ("FP32", "beam_search_diversity_rate"),
    "top_p_decay": ("FP32", "top_p_decay"),
    "top_p_min": ("FP32", "top_p_min"),
    "top_p_reset_ids": ("UINT32", "top_p_reset_ids"),
}
GPT_WORDS = {"stop_words_list": "stop_words", "bad_words_list": "bad_words"}
GPT_INPUTS: dict[str, str] = {**GPT_REQUIRED, **{k: v[0] for k, v in GPT_SCALARS.items()},
                              **{k: "INT32" for k in GPT_WORDS}}
# Triton's FT config also declares these; we accept and ignore them when they are neutral (false / 0, FT's
# "no prompt"; a prompt-learning task id means nothing without a prompt and is ignored, as FT does), and refuse
# a value that asks for what ftjax does not do (context embeddings, soft / prefix prompts).
GPT_IGNORED = {"is_return_context_embeddings": "BOOL", "prompt_learning_task_name_ids": "UINT32",
               "request_prompt_lengths": "UINT32", "request_prompt_type": "UINT32"}
_NOT_SUPPORTED = {"is_return_context_embeddings": "returning the context embeddings",
                  "request_prompt_lengths": "soft prompts (request_prompt_embedding)",
                  "request_prompt_type": "soft / prefix prompts (request_prompt_type 1 or 2)"}
GPT_OUTPUTS = {"output_ids": ("UINT32", [-1, -1, -1]), "sequence_length": ("UINT32", [-1, -1]),
               "cum_log_probs": ("FP32", [-1, -1]), "output_log_probs": ("FP32", [-1, -1, -1])}

# T5 (FT's `all_models/t5/fastertransformer/config.pbtxt`): the same runtime inputs, with the encoder
# prompt's lengths in `sequence_length` and the tokens to generate in `max_output_len`; outputs hold the
# decoder's tokens only, INT32.
T5_RENAMES = {"sequence_length": "input_lengths", "max_output_len": "request_output_len"}
T5_REQUIRED = {"input_ids": "UINT32", "sequence_length": "UINT32", "max_output_len": "UINT32"}
T5_INPUTS: dict[str, str] = {**T5_REQUIRED, **{k: v for k, v in GPT_INPUTS.items() if k not in GPT_REQUIRED}}
T5_OUTPUTS = {"output_ids": ("INT32", [-1, -1, -1]), "sequence_length": ("INT32", [-1, -1]),
              "cum_log_probs": ("FP32", [-1, -1]), "output_log_probs": ("FP32", [-1, -1, -1])}

# Alternate dtypes a client may reasonably send for the same value (FT's own clients send INT32 ids at times).
_INT_OK = {"INT32", "INT64", "UINT32", "UINT64", "INT16", "UINT16", "INT8", "UINT8"}
_FLOAT_OK = {"FP32", "FP64", "FP16"}


@dataclasses.dataclass
class Row:
    """One prompt of a request: ids, tokens to generate, decoding params (a SamplingParams)."""
    prompt: list[int]
    max_new: int
    params: Any


def decode_inputs(request) -> dict[str, np.ndarray]:
    """ModelInferRequest -> {name: np.ndarray} with the declared shapes; raw or typed contents."""
    out: dict[str, np.ndarray] = {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != sum(1 for t in request.inputs if not _has_contents(t)):
        raise TensorError(f"raw_input_contents: {len(raw)} buffers for "
                          f"{sum(1 for t in request.inputs if not _has_contents(t))} inputs without contents")
    ri = 0
    for t in request.inputs:
        name = t.name
        if name in out:
            raise TensorError(f"{name}: given twice")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise TensorError(f"{name}: negative dimension in shape {list(shape)}")
        if t.datatype not in DTYPES or DTYPES[t.datatype][0] is None:
            raise TensorError(f"{name}: unsupported datatype {t.datatype!r}")
        npd, field = DTYPES[t.datatype]
        n = 1
        for d in shape:   # Python ints: np.prod would wrap around for a huge shape
            n *= d
        if _has_contents(t):
            if field is None:
                raise TensorError(f"{name}: datatype {t.datatype} cannot be sent in typed contents")
            vals = list(getattr(t.contents, field))
            if len(vals) != n:
                raise TensorError(f"{name}: {len(vals)} values in contents for shape {list(shape)}")
            arr = np.asarray(vals).astype(npd) if vals else np.zeros((0,), npd)
        else:
            if ri >= len(raw):
                raise TensorError(f"{name}: no data (neither contents nor raw_input_contents)")
            buf = raw[ri]
            ri += 1
            itemsize = np.dtype(npd).itemsize
            if len(buf) != n * itemsize:
                raise TensorError(f"{name}: {len(buf)} bytes of raw data for shape {list(shape)} of "
                                  f"{t.datatype} ({n * itemsize} expected)")
            arr = np.frombuffer(buf, dtype=np.dtype(npd).newbyteorder("<")).astype(npd)
        out[name] = arr.reshape(shape)
    return out


def _has_contents(t) -> bool:
    return t.HasField("contents") and any(len(getattr(t.contents, f)) for f in
                                          ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                                           "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"))


def _check_dtype(name, arr, declared, datatypes):
    got = datatypes[name]
    if got == declared:
        return
    if declared in _INT_OK and got in _INT_OK and name not in ("random_seed",):
        return
    if declared == "UINT64" and got in _INT_OK:
        return
    if declared in _FLOAT_OK and got in _FLOAT_OK:
        return
    raise TensorError(f"{name}: expected datatype {declared}, got {got}")


def _per_row(name, arr, batch):
    """[batch, 1] / [batch] / [1, 1] / [1] / [] -> [batch] values."""
    a = np.asarray(arr)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise TensorError(f"{name}: expected shape [batch, 1] (batch {batch}), got {list(np.shape(arr))}")
    if a.shape[0] == 1 and batch != 1:
        a = np.repeat(a, batch)
    if a.shape[0] != batch:
        raise TensorError(f"{name}: batch dimension {a.shape[0]} disagrees with input_ids batch {batch}")
    return a


def parse_t5(tensors: dict[str, np.ndarray], datatypes: dict[str, str], **kw) -> list[Row]:
    """FT T5 tensors -> Rows (the prompt is the encoder's input). Same rules and errors as GPT's."""
    for name in tensors:
        if name not in T5_INPUTS and name not in GPT_IGNORED:
            raise TensorError(f"{name}: unknown input tensor (expected FasterTransformer's T5 inputs: "
                              f"{', '.join(T5_INPUTS)})")
    for name in T5_REQUIRED:
        if name not in tensors:
            raise TensorError(f"{name}: required input tensor missing")
    back = {v: k for k, v in T5_RENAMES.items()}
    ren = {T5_RENAMES.get(k, k): v for k, v in tensors.items()}
    dts = {T5_RENAMES.get(k, k): v for k, v in datatypes.items()}
    try:
        return parse_gpt(ren, dts, **kw)
    except TensorError as e:
        msg = str(e)
        for new, old in back.items():
            msg = msg.replace(new, old)
        raise TensorError(msg) from None


def parse_gpt(tensors: dict[str, np.ndarray], datatypes: dict[str, str], *, make_params, check_prompt,
              max_request_batch: int = 0) -> list[Row]:
    """FT GPT tensors -> one Row per prompt. `make_params(list[dict]) -> list[SamplingParams]` resolves
    model defaults and verifies; `check_prompt(ids, max_new, field)` raises ValueError."""
    for name in tensors:
        if name not in GPT_INPUTS and name not in GPT_IGNORED:
            raise TensorError(f"{name}: unknown input tensor (expected FasterTransformer's GPT inputs: "
                              f"{', '.join(GPT_INPUTS)})")
    for name in GPT_REQUIRED:
        if name not in tensors:
            raise TensorError(f"{name}: required input tensor missing")
    for name, arr in tensors.items():
        _check_dtype(name, arr, {**GPT_INPUTS, **GPT_IGNORED}[name], datatypes)
        if name in _NOT_SUPPORTED and np.any(arr):
            raise TensorError(f"{name}: {_NOT_SUPPORTED[name]} is not supported by ftjax; send 0 / false or "
                              f"leave the input out")
    ids = tensors["input_ids"]
    if ids.ndim != 2:
        raise TensorError(f"input_ids: expected shape [batch, len], got {list(ids.shape)}")
    batch = ids.shape[0]
    if batch == 0:
        raise TensorError("input_ids: empty batch")
    if max_request_batch and batch > max_request_batch:
        raise TensorError(f"input_ids: batch {batch} exceeds the model's max_batch_size {max_request_batch}")
    ids64 = ids.astype(np.int64)
    lengths = _per_row("input_lengths", tensors["input_lengths"], batch).astype(np.int64)
    out_len = _per_row("request_output_len", tensors["request_output_len"], batch).astype(np.int64)
    for i in range(batch):
        if not 1 <= lengths[i] <= ids.shape[1]:
            raise TensorError(f"input_lengths: row {i} has length {lengths[i]}, outside [1, {ids.shape[1]}] "
                              f"(the input_ids length)")
        if out_len[i] < 1:
            raise TensorError(f"request_output_len: row {i} asks for {out_len[i]} tokens (must be >= 1)")
    kw: list[dict] = [{} for _ in range(batch)]
    for name, (_, field) in GPT_SCALARS.items():
        if name not in tensors:
            continue
        vals = _per_row(name, tensors[name], batch)
        for i in range(batch):
            v = vals[i].item()
            if field == "top_p_reset_ids":
                v = (int(v),)
            elif field == "return_log_probs":
                v = bool(v)
            kw[i][field] = v
    for name, field in GPT_WORDS.items():
        if name not in tensors:
            continue
        w = tensors[name]
        if w.ndim == 2 and w.shape[0] == 2:
            w = w[None]
        if w.ndim != 3 or w.shape[1] != 2:
            raise TensorError(f"{name}: expected shape [batch, 2, L] (FT's word-list encoding), got {list(w.shape)}")
        if w.shape[0] == 1 and batch != 1:
            w = np.repeat(w, batch, axis=0)
        if w.shape[0] != batch:
            raise TensorError(f"{name}: batch dimension {w.shape[0]} disagrees with input_ids batch {batch}")
        for i in range(batch):
            kw[i][field] = np.ascontiguousarray(w[i]).astype(np.int32)
    try:
        params = make_params(kw)
    except ValueError as e:
        raise TensorError(_tensor_msg(str(e))) from None
    rows = []
    for i in range(batch):
        p = ids64[i, : lengths[i]].tolist()
        try:
            check_prompt(p, int(out_len[i]), f"input_ids[{i}]")
        except ValueError as e:
            msg = str(e)
            if msg.startswith("max_new_tokens"):
                msg = f"request_output_len: row {i}: " + msg.split(":", 1)[1].strip()
            raise TensorError(msg) from None
        rows.append(Row(prompt=p, max_new=int(out_len[i]), params=params[i]))
    return rows


_FIELD_TO_TENSOR = {field: name for name, (_, field) in GPT_SCALARS.items()}
_FIELD_TO_TENSOR.update({v: k for k, v in GPT_WORDS.items()})


def _tensor_msg(msg: str) -> str:
    """Prefix a SamplingParams error with the FT tensor its field comes from."""
    for field in sorted(_FIELD_TO_TENSOR, key=len, reverse=True):
        if msg.startswith(field) or f" {field} " in msg[:40]:
            name = _FIELD_TO_TENSOR[field]
            return msg if name == field else f"{name}: {msg}"
    return msg


# ------------------------------------------------------------------------------------------- outputs
def add_output(response, name: str, arr: np.ndarray, datatype: str):
    t = response.outputs.add()
    t.name = name
    t.datatype = datatype
    t.shape.extend(arr.shape)
    response.raw_output_contents.append(np.ascontiguousarray(arr).astype(np.dtype(arr.dtype).newbyteorder("<")).tobytes())


def gpt_outputs(response, beams: list[list[list[int]]], logprobs: list[list[list[float]]] | None,
                requested: set[str] | None = None, int_type: str = "UINT32"):
    """beams[i][k]: prompt + generated ids of row i, beam k (best first) — for T5 the decoder's ids only,
    with int_type INT32; logprobs[i][k]: the log prob of each generated token (or None: no log-prob
    outputs). Rows with fewer beams are padded (length 0)."""
    batch = len(beams)
    W = max(len(b) for b in beams)
    width = max([1] + [len(s) for b in beams for s in b])
    npt = np.uint32 if int_type == "UINT32" else np.int32
    ids = np.zeros((batch, W, width), npt)
    lens = np.zeros((batch, W), npt)
    for i, b in enumerate(beams):
        for k, s in enumerate(b):
            ids[i, k, : len(s)] = s
            lens[i, k] = len(s)
    want = lambda n: not requested or n in requested  # noqa: E731
    if want("output_ids"):
        add_output(response, "output_ids", ids, int_type)
    if want("sequence_length"):
        add_output(response, "sequence_length", lens, int_type)
    if logprobs is not None:
        g = max([1] + [len(lp) for b in logprobs for lp in b])
        cum = np.zeros((batch, W), np.float32)
        olp = np.zeros((batch, W, g), np.float32)
        for i, b in enumerate(logprobs):
            for k, lp in enumerate(b):
                cum[i, k] = float(np.sum(np.asarray(lp, np.float64))) if lp else 0.0
                olp[i, k, : len(lp)] = lp
        if want("cum_log_probs"):
            add_output(response, "cum_log_probs", cum, "FP32")
        if want("output_log_probs"):
            add_output(response, "output_log_probs", olp, "FP32")
