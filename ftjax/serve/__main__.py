"""python -m ftjax.serve [--model PATH | --model-repository DIR] [flags]  (CONTRACTS.md, "CLIs")."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ftjax.serve",
                                 description="Triton gRPC inference server (FasterTransformer tensors) over ftjax")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="one checkpoint (HF, Megatron, FT-converted or ftjax dir), served as "
                                     "'fastertransformer'")
    src.add_argument("--model-repository", help="a Triton model repository: <name>/config.pbtxt (FT's format)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: the config's data_type, else bfloat16")
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--pipeline-parallel", type=int, default=1)
    ap.add_argument("--max-batch-size", type=_slots, default="auto",
                    help="engine slots (rows decoded together); 'auto' (default): as many as the device memory "
                         "left after the weights holds at --max-seq-len (8 on a backend that reports no memory)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="prompt + generated; default: the model's maximum")
    ap.add_argument("--quantize", choices=["int8", "int8-embed"], default=None,
                    help="weight-only INT8: int8 (the projections, as FT's int8_mode=1), int8-embed (also the token "
                         "embedding and so the tied output head)")
    ap.add_argument("--max-beam-width", type=int, default=4,
                    help="the widest beam search a request may ask for (ftjax addition; at most the slots): a beam "
                         "request takes beam_width rows of the cache. Default 4")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--max-queue", type=int, default=1024, help="requests waiting for a slot (beyond those the free slots take at once) before RESOURCE_EXHAUSTED")
    ap.add_argument("--request-timeout", type=float, default=None, help="seconds; a request past it is cancelled")
    ap.add_argument("--compile-cache", default=None,
                    help="jax's persistent compilation cache directory, so a restarted server does not compile "
                         "again (default: $FTJAX_COMPILE_CACHE or ~/.cache/ftjax/jax; 'off' disables)")
    ap.add_argument("--stream-chunk", type=int, default=4,
                    help="decode steps per scheduler iteration while a stream is live (ftjax addition; each token "
                         "still gets its own response, k at a time). 1 sends each token the moment it exists; 4 "
                         "(the default) keeps up with many streams (bench/RESULTS.md, serving)")
    ap.add_argument("--frontends", type=_frontends, default="auto",
                    help="gRPC front-end processes sharing --grpc-port (ftjax addition): with N > 1 this process "
                         "keeps the engines and N spawned processes parse requests and send the responses. "
                         "auto (the default): one per 4 CPU cores, 1 to 4")
    ap.add_argument("--warmup", type=_warmup, default="greedy,sampled",
                    help="compile before reporting ready (ftjax addition): comma-separated request kinds from "
                         "greedy, sampled, penalized, sampled+penalized, beam, each run once per --warmup-lengths "
                         "prompt length through the calls a real request makes; 'none' skips it (the first "
                         "request of each kind then compiles). Default: greedy,sampled")
    ap.add_argument("--warmup-lengths", type=_lengths, default="16",
                    help="prompt lengths the warm-up admits (each a power-of-two bucket of prompts compiled "
                         "once); default 16")
    ap.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0 (multi-host)")
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    a = ap.parse_args(argv)
    for f in ("max_batch_size", "max_queue", "tensor_parallel", "pipeline_parallel", "frontends", "max_beam_width"):
        if getattr(a, f) != "auto" and getattr(a, f) < 1:
            ap.error(f"--{f.replace('_', '-')} must be >= 1")
    if a.request_timeout is not None and a.request_timeout <= 0:
        ap.error("--request-timeout must be > 0")
    multi = (a.coordinator_address, a.num_processes, a.process_id)
    if any(v is not None for v in multi) and not all(v is not None for v in multi):
        ap.error("--coordinator-address, --num-processes and --process-id go together")
    return a


def _frontends(v: str):
    """--frontends: an integer, or auto = one front end per 4 CPU cores, between 1 and 4 (a 2-core box
    keeps the service in this process; a 16-core GPU host gets 4, which serving was measured with)."""
    v = _slots(v)
    return min(4, max(1, (os.cpu_count() or 1) // 4)) if v == "auto" else v


def _warmup(v: str):
    from ftjax.serve.scheduler import WARMUP_KINDS

    if v == "none":
        return ()
    kinds = tuple(k.strip() for k in v.split(",") if k.strip())
    bad = [k for k in kinds if k not in WARMUP_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown warm-up kind(s) {', '.join(bad) or repr(v)}: expected 'none' or "
                                         f"a comma-separated list of {', '.join(WARMUP_KINDS)}")
    return kinds


def _lengths(v: str):
    try:
        out = tuple(int(x) for x in v.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt lengths >= 1, got {v!r}")
    return out


def _slots(v: str):
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {v!r}") from None


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("ftjax.serve")
    from ftjax.sharding import distributed

    if a.num_processes is not None:   # multi-host: one process per host (ftjax/sharding/distributed.py)
        try:
            distributed.initialize(a.coordinator_address, a.num_processes, a.process_id)
        except (ValueError, RuntimeError) as e:
            print(f"error: multi-host: {e}", file=sys.stderr)
            return 2
    from ftjax.serve.server import Server, load_models

    if a.compile_cache != "off":
        from ftjax import compile_cache

        log.info("persistent compilation cache: %s", compile_cache.enable(a.compile_cache))
    try:
        models = load_models(model=a.model, model_repository=a.model_repository, dtype=a.dtype,
                             max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len,
                             tensor_parallel=a.tensor_parallel, pipeline_parallel=a.pipeline_parallel,
                             quantize=a.quantize, max_beam_width=a.max_beam_width)
        if not distributed.lead_or_follow(models):   # processes > 0: ran process 0's engine calls until it stopped
            return 0
        server = Server(models, host=a.host, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                        max_queue=a.max_queue, request_timeout=a.request_timeout,
                        stream_chunk=a.stream_chunk, frontends=a.frontends, warmup=a.warmup,
                        warmup_lengths=a.warmup_lengths).start()
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("serving %s on %s:%d (gRPC), metrics on :%d", ", ".join(m.name for m in models), a.host,
             server.grpc_port, server.metrics_port)
    print(f"ftjax.serve ready: grpc {a.host}:{server.grpc_port} metrics {a.host}:{server.metrics_port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    distributed.release(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
