"""Several gRPC front-end processes for one engine process (`python -m ftjax.serve --frontends N`).

One Python interpreter sends every streamed token as its own gRPC message; at tens of thousands of
messages a second that, not the device, bounds a server (bench/RESULTS.md, serving load). With N > 1
front ends the engine process keeps the models and their schedulers (one thread each, as always) and
runs no gRPC itself; N processes each run the same `Service` on the same port (SO_REUSEPORT: the kernel
spreads client connections over them), parse and validate requests, and build the responses.

    engine process                                   front-end process i (spawned)
    Scheduler threads --deliver--> Hub ==pipe i==>   RemoteEngine reader --loop--> Service streams
                                   Hub <==pipe i==   Service: ("submit", rid, model, rows, ...) / ("cancel", rid)

Per scheduler iteration each front end receives one message with its requests' updates ("tokens": the
new ids of each row, expanded into one response per token by the front end's `StreamView`). Counters
of `ModelStatistics` and the Prometheus metrics of refused requests are per front end; the engine
process serves the metrics of everything it runs.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import socket
import threading
import time
import types

from ftjax.serve.scheduler import QueueFull, Request, Update

log = logging.getLogger("ftjax.serve")


class ModelView:
    """What a front end needs of a model to parse and validate requests, without its weights: the same
    `check_prompt` and `sampling_params` code as Engine / LLM, on a picklable copy of their inputs."""

    def __init__(self, llm):
        eng = llm.engine
        self.cfg = llm.cfg
        self.S = eng.S
        self.max_beam_width = eng.max_beam_width
        self.family = types.SimpleNamespace(samples_at_prefill=eng.family.samples_at_prefill)
        self.engine = self

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("engine")
        d["family"] = d["family"].samples_at_prefill
        return d

    def __setstate__(self, d):
        d["family"] = types.SimpleNamespace(samples_at_prefill=d["family"])
        self.__dict__.update(d)
        self.engine = self

    def check_prompt(self, ids, max_new, field="prompts"):
        from ftjax.engine import Engine

        return Engine.check_prompt(self, ids, max_new, field)

    def sampling_params(self, n, params=None, **decoding):
        from ftjax.llm import LLM

        return LLM.sampling_params(self, n, params, **decoding)


# ------------------------------------------------------------------------------------ engine side
class Hub:
    """In the engine process: spawns the front ends, turns their submits into scheduler Requests and
    sends each scheduler iteration's updates back, one message per front end."""

    def __init__(self, models: dict, host: str, port: int, n: int, request_timeout: float | None):
        self.models = models
        if port:
            _check_port_free(host, port)
        self.port = port or _free_port(host)
        self.live: dict[tuple[int, int], Request] = {}
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")
        metas = [(m.name, ModelView(m.llm), m.config.SerializeToString(), m.max_request_batch, m.decoupled)
                 for m in models.values()]
        self.conns, self.procs, self.send_locks = [], [], []
        for i in range(n):
            mine, theirs = ctx.Pipe()
            self.conns.append(mine)
            self.send_locks.append(threading.Lock())
            self.procs.append(ctx.Process(target=frontend_main, name=f"ftjax-frontend-{i}", daemon=True,
                                          args=(theirs, host, self.port, metas, request_timeout, i)))
        for m in models.values():
            m.scheduler.deliver = self.deliver

    def start(self, timeout: float = 300.0):
        for p in self.procs:
            p.start()
        for i, c in enumerate(self.conns):
            if not c.poll(timeout):
                raise RuntimeError(f"front end {i} did not start within {timeout:.0f} s")
            msg = c.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"front end {i}: {msg[1]}")
        for i in range(len(self.conns)):
            threading.Thread(target=self._reader, args=(i,), name=f"ftjax-hub-{i}", daemon=True).start()

    def _reader(self, i: int):
        conn = self.conns[i]
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "submit":
                _, rid, name, rows, stream, timeout, want_lp = msg
                m = self.models[name]
                req = Request(rows, stream=stream, timeout=timeout, want_logprobs=want_lp)
                req.fe, req.rid = i, rid
                with self._lock:
                    self.live[(i, rid)] = req
                try:
                    m.scheduler.submit(req)
                except QueueFull as e:
                    with self._lock:
                        self.live.pop((i, rid), None)
                    self._send(i, ("updates", [(rid, Update("error", code="full", message=str(e)))]))
            elif msg[0] == "cancel":
                with self._lock:
                    r = self.live.get((i, msg[1]))
                if r is not None:
                    r.cancel()
                    self._wake()
        with self._lock:   # the front end is gone: its requests free their slots
            gone = [r for (fe, _), r in self.live.items() if fe == i]
        for r in gone:
            r.cancel()
        self._wake()

    def _wake(self):
        for m in self.models.values():
            m.scheduler.wake()

    def deliver(self, items):
        """A scheduler thread's iteration: [(request, update)] -> one message per front end."""
        by = collections.defaultdict(list)
        with self._lock:
            for r, u in items:
                by[r.fe].append((r.rid, u))
                if u.kind in ("done", "error"):
                    self.live.pop((r.fe, r.rid), None)
        for fe, batch in by.items():
            self._send(fe, ("updates", batch))

    def _send(self, i, msg):
        with self.send_locks[i]:
            try:
                self.conns[i].send(msg)
            except (OSError, ValueError):   # that front end is gone
                pass

    def stop(self, grace: float = 1.0):
        for i in range(len(self.conns)):
            self._send(i, ("stop", grace))
        deadline = time.monotonic() + grace + 10
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)

    def wait(self):
        for p in self.procs:
            p.join()


def _check_port_free(host: str, port: int) -> None:
    """The front ends bind with SO_REUSEPORT, which would share the port with another server already on it
    (the kernel splitting connections between the two): a plain bind first finds such a listener."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a closed server's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot bind gRPC to {host}:{port}: {e.strerror or e} (another server on it?)") from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- front-end side
class RemoteEngine:
    """In a front end: stands in for the engine process's schedulers (`proxy(name)`)."""

    def __init__(self, conn):
        self.conn = conn
        self.reqs: dict[int, Request] = {}
        self._next = 0
        self._cancel_sent: set[int] = set()
        self._lock = threading.Lock()
        self.deliver = None   # set by the Server: hands updates to its event loop

    def proxy(self, name: str) -> "_Proxy":
        return _Proxy(self, name)

    def _send(self, msg):
        with self._lock:
            self.conn.send(msg)

    def submit(self, name: str, req: Request):
        with self._lock:
            rid = self._next
            self._next += 1
            self.reqs[rid] = req
        left = None if req.deadline is None else max(1e-3, req.deadline - time.monotonic())
        try:
            self._send(("submit", rid, name, req.rows, req.stream, left, req.want_logprobs))
        except (OSError, ValueError) as e:
            with self._lock:
                self.reqs.pop(rid, None)
            raise QueueFull(f"the engine process is gone ({e})") from None

    def wake(self):
        with self._lock:
            todo = [rid for rid, r in self.reqs.items() if r.cancelled.is_set() and rid not in self._cancel_sent]
            self._cancel_sent.update(todo)
        for rid in todo:
            try:
                self._send(("cancel", rid))
            except (OSError, ValueError):
                pass

    def run(self, on_stop=None) -> float | None:
        """Reads the engine's updates until it says stop (-> grace seconds) or goes away (-> None). With on_stop
        (the Server's stop(grace)), a stop runs it on another thread while the updates go on arriving, so the
        requests that finish within the grace period are answered; returns when it has finished."""
        stopper = None
        grace = 0.0
        while True:
            if stopper is not None:
                if not stopper.is_alive():
                    return grace
                try:
                    if not self.conn.poll(0.05):
                        continue
                except (EOFError, OSError):
                    break
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                grace = float(msg[1])
                if on_stop is None:
                    return grace
                if stopper is None:
                    stopper = threading.Thread(target=on_stop, args=(grace,), name="ftjax-frontend-stop")
                    stopper.start()
                continue
            items = []
            with self._lock:
                for rid, u in msg[1]:
                    r = self.reqs.get(rid)
                    if r is None:
                        continue
                    if u.kind in ("done", "error"):
                        self.reqs.pop(rid, None)
                        self._cancel_sent.discard(rid)
                    items.append((r, u))
            if items and self.deliver is not None:
                self.deliver(items)
        if stopper is not None:   # the engine went away during the grace period: the stop goes on
            stopper.join()
            return grace
        with self._lock:
            items = [(r, Update("error", code="unavailable", message="the engine process is gone"))
                     for r in self.reqs.values()]
            self.reqs.clear()
        if items and self.deliver is not None:
            self.deliver(items)
        return None


class _Proxy:
    """A model's scheduler as the front end's Service sees it."""

    def __init__(self, remote: RemoteEngine, name: str):
        self.remote, self.name = remote, name
        self.ready = threading.Event()
        self.ready.set()
        self.error = None
        self.waiting = 0

    @property
    def deliver(self):
        return self.remote.deliver

    @deliver.setter
    def deliver(self, fn):
        self.remote.deliver = fn

    def start(self):
        return self

    def stop(self, timeout: float = 0.0):
        pass

    def submit(self, req: Request) -> Request:
        self.remote.submit(self.name, req)
        return req

    def wake(self):
        self.remote.wake()


def frontend_main(conn, host, port, metas, request_timeout, index):
    """A front-end process: the Service on (host, port) with SO_REUSEPORT, requests to the engine."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s frontend-{index} %(levelname)s %(message)s")
    from tritonclient.grpc import model_config_pb2 as mc

    from ftjax.serve.server import Model, Server

    try:
        remote = RemoteEngine(conn)
        models = [Model(name=name, llm=view, config=mc.ModelConfig.FromString(cfg), max_request_batch=mrb,
                        decoupled=dec) for name, view, cfg, mrb, dec in metas]
        srv = Server(models, host=host, grpc_port=port, metrics_port=None, request_timeout=request_timeout,
                     remote=remote).start()
    except Exception as e:  # noqa: BLE001 - reported to the engine process, which refuses to start
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    if remote.run(on_stop=srv.stop) is None:   # the engine process is gone (no stop message): stop now
        srv.stop(0.0)
