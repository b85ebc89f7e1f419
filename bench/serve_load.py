"""Serving load benchmark (GPU): N concurrent streaming clients against an in-process ftjax server
vs offline `llm.generate` on the same work.

    python bench/serve_load.py [--model PATH] [--dtype bfloat16] [--clients 64] [--requests 256]
        [--prompt-len 128] [--output-len 128] [--max-batch-size 64] [--max-seq-len 512] [--json out.json]
        [--stream-chunk 1,4] [--frontends 1,4]

Every client runs requests back to back over ModelStreamInfer (one response per token) with the real
`tritonclient.grpc`, so the server sees `--clients` requests in flight. Reported: aggregate generated
tokens/s, time to first token (TTFT) p50/p99, inter-token latency p50/p99, requests/s, and the offline
throughput of `llm.generate` over the same prompts in batches of --max-batch-size (same engine config;
compiled before timing), with the ratio serve / offline (target >= 0.8 at 64 clients).
Prompt lengths and output lengths are uniform in [len/2, len] (seeded) so requests join and leave the
running batch. Greedy decoding with end_id disabled by min_length, so every request makes exactly its
output length.

On the device `tritonclient` may be missing: install its wheel (and python-rapidjson) with --no-deps.
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def make_work(n, prompt_len, output_len, vocab, seed=0):
    rng = np.random.RandomState(seed)
    work = []
    for _ in range(n):
        p = rng.randint(1, vocab - 1, size=rng.randint(max(1, prompt_len // 2), prompt_len + 1)).tolist()
        work.append((p, int(rng.randint(max(1, output_len // 2), output_len + 1))))
    return work


def inputs(grpcclient, prompt, out_len):
    def t(name, arr, dt):
        x = grpcclient.InferInput(name, list(arr.shape), dt)
        x.set_data_from_numpy(arr)
        return x

    return [t("input_ids", np.array([prompt], np.uint32), "UINT32"),
            t("input_lengths", np.array([[len(prompt)]], np.uint32), "UINT32"),
            t("request_output_len", np.array([[out_len]], np.uint32), "UINT32"),
            t("min_length", np.array([[out_len]], np.uint32), "UINT32")]


def _client_proc(url, jobs, results, threads_n, timeout, ready=None, go=None):
    """One client process: `threads_n` streaming clients pulling work from the shared `jobs` queue. With
    `ready`/`go`: each client connects and opens its stream, the process says so on `ready`, and no request
    goes out before `go` is set (the timed window starts there, not at process spawn)."""
    import tritonclient.grpc as grpcclient

    ttft, itl, errors, per_req = [], [], [], []
    ends = []
    lock = threading.Lock()
    connected = threading.Barrier(threads_n + 1)

    def client():
        c = grpcclient.InferenceServerClient(url)
        q = queue.Queue()
        c.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))
        connected.wait()
        if go is not None:
            go.wait()
        try:
            while True:
                job = jobs.get()
                if job is None:
                    return
                prompt, out_len = job
                t0 = time.perf_counter()
                c.async_stream_infer("fastertransformer", inputs(grpcclient, prompt, out_len))
                last, n, gaps, first = None, 0, [], None
                while True:
                    t, result, error = q.get(timeout=timeout)
                    if error is not None:
                        with lock:
                            errors.append(str(error))
                        break
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        with lock:
                            ends.append(time.monotonic())   # one clock across processes
                        break
                    n += 1
                    if first is None:
                        first = t - t0
                    else:
                        gaps.append(t - last)
                    last = t
                with lock:
                    if first is not None:
                        ttft.append(first)
                    itl.extend(gaps)
                    per_req.append(n)
        finally:
            c.stop_stream()
            c.close()

    ths = [threading.Thread(target=client) for _ in range(threads_n)]
    for th in ths:
        th.start()
    connected.wait()
    if ready is not None:
        ready.put(1)
    for th in ths:
        th.join()
    results.put(dict(ttft=ttft, itl=itl, errors=errors, per_req=per_req, end=max(ends, default=None)))


def run_clients(url, work, clients, timeout=600, procs=8):
    """`clients` concurrent streaming clients spread over `procs` client processes (so the clients'
    Python does not share the server's interpreter lock)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, clients))
    jobs, results = ctx.Queue(), ctx.Queue()
    for w in work:
        jobs.put(w)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    for _ in range(clients):
        jobs.put(None)
    ready, go = ctx.Queue(), ctx.Event()
    ps = [ctx.Process(target=_client_proc, args=(url, jobs, results, n, timeout, ready, go)) for n in per]
    t_spawn = time.monotonic()
    for p in ps:
        p.start()
    for _ in ps:   # every client connected, its stream open: the timed window starts now
        ready.get(timeout=timeout)
    t0 = time.monotonic()
    go.set()
    outs = [results.get(timeout=timeout) for _ in ps]
    t_end = max([o["end"] for o in outs if o["end"] is not None], default=time.monotonic())
    wall = t_end - t0
    for p in ps:
        p.join(timeout=30)
    ttft = [x for o in outs for x in o["ttft"]]
    itl = [x for o in outs for x in o["itl"]]
    errors = [x for o in outs for x in o["errors"]]
    per_req = [x for o in outs for x in o["per_req"]]
    return dict(wall_s=wall, wall_incl_spawn_s=t_end - t_spawn, tokens=sum(per_req), requests=len(per_req),
                errors=errors[:5], n_errors=len(errors),
                ttft=ttft, itl=itl)


def offline(llm, work, batch):
    """llm.generate over the same work in batches of `batch` (each batch decodes to its longest output)."""
    total, t0 = 0, time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i:i + batch]
        longest = max(o for _, o in chunk)
        res = llm.generate([p for p, _ in chunk], max_new_tokens=longest, min_length=longest)
        total += sum(min(len(t), o) for t, (_, o) in zip(res.tokens, chunk))   # count only the asked tokens
    return time.perf_counter() - t0, total


def precompile(llm, work, B):
    """Compile prefill/insert for every (rows, prompt-bucket) shape the scheduler may use, so that TTFT
    measures serving, not XLA compilation."""
    from ftjax.engine import bucket

    eng = llm.engine
    st = eng.init_state()
    plist = llm.sampling_params(1, min_length=1)
    Ts = sorted({bucket(len(p), 16, eng.S) for p, _ in work})
    b = 1
    while True:
        for T in Ts:
            n = min(b, B)
            st = eng.prefill_insert(st, [[1] * min(T, eng.S - 2)] * n, list(range(n)), [2] * n, plist * n)
            st, _ = eng.generate_steps(st, 1)
            st = eng.retire(st, list(range(n)))
        if b >= B:
            break
        b *= 2
    np.asarray(st.seq_len)


def trace_window(dest, after_s, dur_s):
    """Profile this process for dur_s seconds, after_s seconds from now; the Perfetto JSON goes to dest."""
    import tempfile

    import jax

    from bench.common import host_profile_options, perfetto_file

    time.sleep(after_s)
    tdir = tempfile.mkdtemp(prefix="serve_trace_")
    jax.profiler.start_trace(tdir, create_perfetto_trace=True, profiler_options=host_profile_options())
    time.sleep(dur_s)
    jax.profiler.stop_trace()
    perfetto_file(tdir, dest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8, help="decode steps per scheduler iteration when no stream is live")
    ap.add_argument("--stream-chunk", default="1", help="comma list: decode steps per scheduler iteration while a "
                    "stream is live (each token still gets its own response); one serve run per value")
    ap.add_argument("--client-procs", type=int, default=8)
    ap.add_argument("--frontends", default="1", help="comma list: gRPC front-end processes (python -m ftjax.serve "
                    "--frontends); one serve run per value and stream chunk")
    ap.add_argument("--early-release", default="1", help="comma list of 1/0: the scheduler reuses a slot as soon "
                    "as its row must have ended (1, the default) or once its snapshot says so (0); one run per value")
    ap.add_argument("--admit-after", default="1", help="comma list of 1/0: while rows decode, the scheduler admits "
                    "waiting requests after dispatching the next generate call (1) or before it (0)")
    ap.add_argument("--admit-min-rows", default="1", help="comma list: Scheduler.admit_min_rows (while rows decode, "
                    "an admit call waits for this many rows or admit_max_wait_s)")
    ap.add_argument("--reader", default="0", help="comma list of 1/0: Scheduler.reader_thread (snapshots read back "
                    "and turned into responses on a second thread)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--trace", default=None, help="profile the server process (GPU kernels, XLA runtime and "
                    "Python, all threads) for --trace-s seconds, --trace-after seconds into each timed run, and "
                    "copy the Perfetto JSON here (a run's tag is added to the name); read with bench/host_trace.py. "
                    "For diagnosis only: on the H100 (jax 0.11.2) both profiled runs failed with "
                    "CUDA_ERROR_LAUNCH_FAILED after the window (bench/RESULTS.md)")
    ap.add_argument("--trace-s", type=float, default=1.0)
    ap.add_argument("--trace-after", type=float, default=3.0)
    a = ap.parse_args()

    import jax

    import ftjax
    from ftjax.serve.server import Server, load_models

    models = load_models(model=a.model, dtype=a.dtype, max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len,
                         attention=a.attention)
    llm = models[0].llm
    work = make_work(a.requests, a.prompt_len, a.output_len, llm.cfg.vocab_size)
    warm = make_work(max(a.clients, a.max_batch_size), a.prompt_len, 4, llm.cfg.vocab_size, seed=1)

    # offline first (its own state), compiled on a warm-up pass (31 new tokens = decode loops of every
    # chunk size the engine compiles: 16, 8, 4, 2, 1)
    offline(llm, warm[: a.max_batch_size], a.max_batch_size)
    llm.generate([p for p, _ in warm[: a.max_batch_size]], max_new_tokens=min(31, a.max_seq_len - a.prompt_len))
    offline(llm, work, a.max_batch_size)   # every batch's step count compiled before the timed pass
    off_s, off_tokens = offline(llm, work, a.max_batch_size)
    llm._state = None   # free the offline decode state before serving

    precompile(llm, work, a.max_batch_size)
    runs = {}
    for fe, sc, er, aa, am, rd in [(f, c, e, x, m, d) for f in a.frontends.split(",") for c in a.stream_chunk.split(",")
                                   for e in a.early_release.split(",") for x in a.admit_after.split(",")
                                   for m in a.admit_min_rows.split(",") for d in a.reader.split(",")]:
        fe, sc, er, aa, am, rd = int(fe), int(sc), bool(int(er)), bool(int(aa)), int(am), bool(int(rd))
        srv = Server(models, grpc_port=0, metrics_port=None, chunk=a.chunk, stream_chunk=sc,
                     max_queue=max(1024, a.requests), frontends=fe).start()
        for m in models:
            m.scheduler.early_release = er
            m.scheduler.admit_after_dispatch = aa
            m.scheduler.admit_min_rows = am
            m.scheduler.reader_thread = rd
        url = f"127.0.0.1:{srv.grpc_port}"
        try:
            run_clients(url, warm, a.clients, procs=a.client_procs)           # compile prefill buckets / steps
            tracer = None
            if a.trace:
                tracer = threading.Thread(target=trace_window, daemon=True,
                                          args=(a.trace.replace(".json.gz", "") + f"_fe{fe}_sc{sc}_er{int(er)}_aa{int(aa)}_am{am}_rd{int(rd)}.json.gz",
                                                a.trace_after, a.trace_s))
                tracer.start()
            sch = models[0].scheduler
            c0 = (sch.steps_dispatched, sch.slot_steps_dispatched)
            ph0 = dict(sch.phase_s)
            a0 = (sch.admit_calls, sch.rows_admitted)
            runs[(fe, sc, er, aa, am, rd)] = run_clients(url, work, a.clients, procs=a.client_procs)
            steps = sch.steps_dispatched - c0[0]
            runs[(fe, sc, er, aa, am, rd)].update(
                decode_steps=steps, occupancy=(sch.slot_steps_dispatched - c0[1]) / max(1, steps * sch.B),
                admit_calls=sch.admit_calls - a0[0], rows_admitted=sch.rows_admitted - a0[1],
                phase_s={k: round(v - ph0.get(k, 0.0), 3) for k, v in sch.phase_s.items()})
            if tracer is not None:
                tracer.join(timeout=120)
        finally:
            srv.stop()
    for (fe, sc, er, aa, am, rd), r in runs.items():
        report(a, llm, jax, ftjax, sc, r, off_s, off_tokens, fe, er, aa, am, rd)


def report(a, llm, jax, ftjax, sc, r, off_s, off_tokens, frontends=1, early_release=True, admit_after=True,
           admit_min_rows=1, reader=False):
    out = {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "ftjax": ftjax.__version__,
        "date": time.strftime("%Y-%m-%d"), "model": a.model or "embedded default", "dtype": a.dtype,
        "clients": a.clients, "requests": a.requests, "prompt_len": a.prompt_len, "output_len": a.output_len,
        "max_batch_size": a.max_batch_size, "max_seq_len": a.max_seq_len, "chunk": a.chunk, "stream_chunk": sc, "frontends": frontends, "early_release": early_release, "admit_after_dispatch": admit_after, "admit_min_rows": admit_min_rows, "reader_thread": reader,
        "client_procs": a.client_procs,
        # the timed window: from the moment every client is connected (streams open) to the last final
        # response. Earlier RESULTS rows timed from the spawn of the client processes (`*_incl_spawn`).
        "serve_tokens": r["tokens"], "serve_wall_s": round(r["wall_s"], 3),
        "serve_wall_incl_spawn_s": round(r.get("wall_incl_spawn_s", float("nan")), 3),
        "serve_tokens_per_s_incl_spawn": round(r["tokens"] / r.get("wall_incl_spawn_s", float("nan")), 1),
        "serve_tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
        "serve_requests_per_s": round(r["requests"] / r["wall_s"], 2),
        "ttft_p50_ms": round(1e3 * pct(r["ttft"], 50), 2), "ttft_p99_ms": round(1e3 * pct(r["ttft"], 99), 2),
        "itl_p50_ms": round(1e3 * pct(r["itl"], 50), 2), "itl_p99_ms": round(1e3 * pct(r["itl"], 99), 2),
        "itl_mean_ms": round(1e3 * statistics.fmean(r["itl"]), 2) if r["itl"] else None,
        "errors": r["n_errors"], "error_samples": r["errors"],
        # slots holding a request, averaged over the decode steps dispatched (weighted by steps), and the
        # decode steps per second: tokens/s = steps/s x slots x occupancy x (share of held slots producing)
        "occupancy": round(r.get("occupancy", float("nan")), 3),
        "decode_steps_per_s": round(r.get("decode_steps", 0) / r["wall_s"], 1),
        # the scheduler's host seconds per phase over the timed run (dispatch = generate calls; with the
        # reader thread, readback/process/deliver overlap the dispatch thread's work)
        "phase_s": r.get("phase_s"),
        "admit_calls": r.get("admit_calls"), "rows_admitted": r.get("rows_admitted"),
        "offline_tokens": off_tokens, "offline_wall_s": round(off_s, 3),
        "offline_tokens_per_s": round(off_tokens / off_s, 1),
    }
    out["serve_over_offline"] = round(out["serve_tokens_per_s"] / out["offline_tokens_per_s"], 3)
    from bench.common import emit_row
    emit_row(out, a.json, indent=2)


if __name__ == "__main__":
    main()
