#!/usr/bin/env python3
"""Send a request file in FasterTransformer's format to an ftjax (or Triton FT) server over gRPC.

    python serve/client.py serve/requests/sample_request_single.json [--url 127.0.0.1:8001]
        [--model fastertransformer] [--stream] [--params runtime_top_k=4 --params random_seed=7]
        [--json]

The file is FT's `{"request": [{"name": ..., "data": [...], "dtype": "uint32"}, ...]}` (the format of
FT backend's tools/requests/*.json): GPT's `input_ids`, `input_lengths`, `request_output_len`, or T5's
`input_ids`, `sequence_length`, `max_output_len` (serve/requests/sample_request_t5.json). `--params NAME=VALUE` sets the tensor NAME to VALUE for every row
(its dtype from the file when present, else FT's declared dtype; VALUE may be JSON, e.g. a nested list
for stop_words_list). `--stream` uses ModelStreamInfer and prints every partial result as it arrives.
Prints one JSON object per response line with --json, readable text otherwise.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time

import numpy as np

FT_DTYPES = {  # FT's GPT inputs (serve/model_repository/gpt/fastertransformer/config.pbtxt), and T5's own
    "sequence_length": "uint32", "max_output_len": "uint32",
    "input_ids": "uint32", "input_lengths": "uint32", "request_output_len": "uint32", "runtime_top_k": "uint32",
    "runtime_top_p": "float32", "beam_search_diversity_rate": "float32", "temperature": "float32",
    "len_penalty": "float32", "repetition_penalty": "float32", "presence_penalty": "float32",
    "min_length": "uint32", "random_seed": "uint64", "is_return_log_probs": "bool", "beam_width": "uint32",
    "start_id": "uint32", "end_id": "uint32", "stop_words_list": "int32", "bad_words_list": "int32",
    "top_p_decay": "float32", "top_p_min": "float32", "top_p_reset_ids": "uint32",
}
TRITON = {"uint32": "UINT32", "uint64": "UINT64", "int32": "INT32", "int64": "INT64", "float32": "FP32",
          "float16": "FP16", "bool": "BOOL", "uint8": "UINT8", "int8": "INT8"}


def load_request(path: str | None, overrides: list[str]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    if path:
        with open(path) as f:
            spec = json.load(f)
        for t in spec["request"]:
            tensors[t["name"]] = np.array(t["data"], dtype=t["dtype"])
    batch = tensors["input_ids"].shape[0] if "input_ids" in tensors else 1
    for ov in overrides:
        if "=" not in ov:
            raise SystemExit(f"--params {ov!r}: expected NAME=VALUE")
        name, val = ov.split("=", 1)
        name = name.strip()
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        dtype = tensors[name].dtype if name in tensors else np.dtype(FT_DTYPES.get(name, "float32"))
        arr = np.array(v, dtype=dtype)
        if arr.ndim == 0:
            arr = np.full((batch, 1), arr, dtype=dtype)
        elif name in ("stop_words_list", "bad_words_list") and arr.ndim == 2:
            arr = np.repeat(arr[None], batch, axis=0)
        tensors[name] = arr
    # GPT's required inputs, or T5's (the encoder prompt's lengths in sequence_length, max_output_len)
    t5 = "sequence_length" in tensors or "max_output_len" in tensors
    for req in ("input_ids",) + (("sequence_length", "max_output_len") if t5 else ("input_lengths", "request_output_len")):
        if req not in tensors:
            raise SystemExit(f"request: tensor {req} missing (give a request file or --params {req}=...)")
    return tensors


def _inputs(grpcclient, tensors):
    out = []
    for name, arr in tensors.items():
        t = grpcclient.InferInput(name, list(arr.shape), TRITON[str(arr.dtype)])
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _summary(result, t0, final=None):
    ids = result.as_numpy("output_ids")
    lens = result.as_numpy("sequence_length")
    d = {"elapsed_s": round(time.perf_counter() - t0, 4),
         "output_ids": [[ids[b, k, : lens[b, k]].tolist() for k in range(ids.shape[1])] for b in range(ids.shape[0])],
         "sequence_length": lens.tolist()}
    for n in ("cum_log_probs", "output_log_probs"):
        a = result.as_numpy(n)
        if a is not None:
            d[n] = a.tolist()
    if final is not None:
        d["final"] = final
    return d


def _print(d, as_json):
    if as_json:
        print(json.dumps(d), flush=True)
    else:
        tag = " (final)" if d.get("final") else ""
        print(f"[{d['elapsed_s']:.3f}s]{tag} lengths {d['sequence_length']}")
        for b, beams in enumerate(d["output_ids"]):
            print(f"  row {b}: {beams[0]}")
        if "cum_log_probs" in d:
            print(f"  cum_log_probs {d['cum_log_probs']}")
        sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("request_file", nargs="?")
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--model", default="fastertransformer")
    ap.add_argument("--params", action="append", default=[], help="NAME=VALUE tensor override (repeatable)")
    ap.add_argument("--stream", action="store_true", help="ModelStreamInfer: print each partial result")
    ap.add_argument("--json", action="store_true", help="one JSON object per response")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds")
    a = ap.parse_args(argv)

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    tensors = load_request(a.request_file, a.params)
    t0 = time.perf_counter()
    with grpcclient.InferenceServerClient(a.url) as client:
        if not a.stream:
            try:
                res = client.infer(a.model, _inputs(grpcclient, tensors), client_timeout=a.timeout)
            except InferenceServerException as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            _print(_summary(res, t0), a.json)
            return 0
        q: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(a.model, _inputs(grpcclient, tensors))
        rc = 0
        deadline = time.monotonic() + a.timeout
        while True:
            try:
                result, error = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                print("error: timed out waiting for the stream", file=sys.stderr)
                rc = 1
                break
            if error is not None:
                print(f"error: {error}", file=sys.stderr)
                rc = 1
                break
            p = result.get_response().parameters
            final = bool(p["triton_final_response"].bool_param) if "triton_final_response" in p else False
            _print(_summary(result, t0, final), a.json)
            if final:
                break
        client.stop_stream()
        return rc


if __name__ == "__main__":
    sys.exit(main())
