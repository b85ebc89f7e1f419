"""Continuous batching: one thread owns the engine and its decode state.

Each iteration of the scheduler thread:
  1. drops cancelled and timed-out requests (their slots are retired at once),
  2. admits waiting rows into free slots, first come first served (one `prefill_insert` call for all
     rows admitted this iteration; a request of several rows may be admitted across iterations),
  3. runs `generate_steps(state, k)`: k = stream_chunk (default 1) while a streaming request is live (one
     response per token as soon as it exists), otherwise a small chunk so that new arrivals join soon,
  4. reads back `seq_len` / `done` of the live slots, pushes stream updates, completes finished requests.
Every slot advances every step, so a short request submitted while a long one runs finishes first.
The request handlers (gRPC threads) only enqueue `Request`s and wait on their events.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

log = logging.getLogger("ftjax.serve")


class QueueFull(Exception):
    """The waiting queue is at --max-queue: RESOURCE_EXHAUSTED."""


@dataclasses.dataclass
class Update:
    """What a request's handler receives. kind: "token" (streaming, one new token), "done", "error"."""
    kind: str
    seqs: list | None = None       # "token": per row, prompt + generated so far; "done": per row, a list of
                                   # beams (best first; one for sampling), each prompt + generated ids
    logprobs: list | None = None   # "done": per row, per beam, log prob of each generated token (when asked)
    code: str | None = None                    # "cancelled" | "deadline" | "invalid" | "internal" (errors)
    message: str = ""


class Request:
    def __init__(self, rows, *, stream: bool = False, timeout: float | None = None,
                 on_update: Callable[[Update], None] | None = None, want_logprobs: bool = False):
        self.rows = rows                      # list[tensors.Row]
        self.stream = stream
        self.want_logprobs = want_logprobs
        self.t_arrival = time.monotonic()
        self.deadline = None if not timeout else self.t_arrival + timeout
        self.t_admitted: float | None = None
        self.t_first: float | None = None
        self.slots: list[list[int] | None] = [None] * len(rows)   # per row: its slots (beam_width of them)
        self.sent: list[int] = [0] * len(rows)    # seq_len reported so far per row (streaming)
        self.row_done: list[bool] = [False] * len(rows)
        self.result_seqs: list[list[list[int]] | None] = [None] * len(rows)   # per row, per beam
        self.result_lps: list[list[list[float]] | None] = [None] * len(rows)
        self.next_row = 0                         # rows admitted so far (in order)
        self.last_seqs: dict[int, list[int]] = {}   # streaming: ids last sent per row
        self.cancelled = threading.Event()
        self.finished = False
        self._events: queue.Queue[Update] = queue.Queue()
        self._on_update = on_update

    def cancel(self):
        self.cancelled.set()

    def push(self, u: Update):
        if self._on_update is not None:
            self._on_update(u)
        else:
            self._events.put(u)

    def get(self, timeout=None) -> Update:
        return self._events.get(timeout=timeout)


class Scheduler:
    def __init__(self, llm, *, max_queue: int = 1024, chunk: int = 8, stream_chunk: int = 1, metrics=None,
                 model_name: str = "fastertransformer"):
        self.llm = llm
        self.engine = llm.engine
        self.encdec = not self.engine.family.samples_at_prefill
        self.B = self.engine.B
        self.max_queue = max_queue
        self.chunk = max(1, int(chunk))
        # Decode steps per iteration while a stream is live: 1 sends each token as soon as it exists;
        # more amortise the host's per-iteration work (every token still gets its own response).
        self.stream_chunk = max(1, int(stream_chunk))
        self.metrics = metrics
        self.model_name = model_name
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self._free = list(range(self.B))
        self._state = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ftjax-scheduler-{model_name}", daemon=True)

    # ------------------------------------------------------------------------------ handler side
    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def submit(self, req: Request) -> Request:
        with self._cv:
            if self._stop:
                raise QueueFull("server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def wake(self):
        with self._cv:
            self._cv.notify_all()

    @property
    def live_slots(self) -> int:
        return self.B - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------------------- scheduler side
    def _run(self):
        try:
            self._state = self.engine.init_state()
            self.ready.set()
            while True:
                with self._cv:
                    if self._stop:
                        break
                    if not self._live and not self._waiting:
                        self._cv.wait(timeout=0.5)
                        continue
                self._iteration()
        except BaseException as e:  # noqa: BLE001 - the engine failed: fail everything, stop serving
            log.exception("scheduler failed")
            self.error = e
            self.ready.set()
            for r in list(self._live) + list(self._waiting):
                self._fail(r, "internal", f"engine failure: {e}")
        finally:
            with self._cv:
                self._stop = True
                pending = list(self._waiting)
                self._waiting.clear()
            for r in pending + self._live:
                if not r.finished:
                    self._fail(r, "unavailable", "server is shutting down")

    def _iteration(self):
        now = time.monotonic()
        self._drop_cancelled(now)
        admitted = self._admit(now)
        if admitted and any(r.stream for r in admitted):
            self._sync()  # the first token exists after prefill: stream it now
        live = [r for r in self._live if not r.finished]
        if not live:
            return
        k = self.stream_chunk if any(r.stream for r in live) else self.chunk
        self._state, _ = self.engine.generate_steps(self._state, k)
        self._sync()

    def _drop_cancelled(self, now):
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled.is_set() or (r.deadline and now > r.deadline)]
            for r in gone:
                self._waiting.remove(r)
        retire = []
        for r in list(self._live):
            if r.cancelled.is_set() or (r.deadline and now > r.deadline):
                retire += [x for s in r.slots if s is not None for x in s]
                gone.append(r)
                self._live.remove(r)
        if retire:
            self._state = self.engine.retire(self._state, retire)
            self._free.extend(retire)
        for r in gone:
            if r.cancelled.is_set():
                self._fail(r, "cancelled", "request cancelled by the client")
            else:
                self._fail(r, "deadline", "request timed out (--request-timeout)")

    def _admit(self, now) -> list[Request]:
        picks: list[tuple[Request, int, list[int]]] = []   # (request, row index, slots)
        with self._cv:
            while self._free and self._waiting:
                r = self._waiting[0]
                i = r.next_row
                need = _width(r.rows[i].params)
                rest = sum(_width(row.params) for row in r.rows[i:])
                if need > len(self._free) or (i == 0 and len(self._free) < rest <= self.B):
                    break   # a request's rows start together (they stream in step) unless it is wider than B
                slot, self._free = self._free[:need], self._free[need:]
                picks.append((r, i, slot))
                r.next_row += 1
                if r.next_row == len(r.rows):
                    self._waiting.popleft()
        if not picks:
            return []
        reqs = list(dict.fromkeys(r for r, _, _ in picks))
        try:
            self._prefill([(r.rows[i], s) for r, i, s in picks])
        except ValueError:
            # One request's params did not fit (e.g. word-list capacity): admit one by one, fail the bad.
            self._ensure_state()
            ok = []
            for r in reqs:
                mine = [(r.rows[i], s) for rr, i, s in picks if rr is r]
                try:
                    self._prefill(mine)
                    ok.append(r)
                except ValueError as e:
                    self._ensure_state()
                    self._free.extend(x for rr, _, s in picks if rr is r for x in s)
                    with self._cv:
                        if r in self._waiting:
                            self._waiting.remove(r)
                    self._fail(r, "invalid", str(e))
            reqs = ok
        for r, i, s in picks:
            if r in reqs:
                r.slots[i] = s
        for r in reqs:
            if r.t_admitted is None:
                r.t_admitted = now
                if self.metrics:
                    self.metrics.queue_time(self.model_name, now - r.t_arrival)
            if r not in self._live:
                self._live.append(r)
        return reqs

    def _prefill(self, items):
        prompts = [row.prompt for row, _ in items]
        slots = [s if len(s) > 1 else s[0] for _, s in items]
        self._state = self.engine.prefill_insert(self._state, prompts, slots,
                                                 [row.max_new for row, _ in items], [row.params for row, _ in items])

    def _ensure_state(self):
        """After a failed call the donated state may be gone: rebuild it (live requests fail)."""
        leaf = self._state.seq
        if getattr(leaf, "is_deleted", lambda: False)():
            log.error("decode state lost after a failed engine call; failing live requests")
            for r in list(self._live):
                self._live.remove(r)
                self._fail(r, "internal", "engine state was reset")
            self._free = list(range(self.B))
            self._state = self.engine.init_state()

    def _sync(self):
        live = [r for r in self._live if not r.finished]
        if not live:
            return
        st = self._state
        seq_len = np.asarray(st.seq_len)
        done = np.asarray(st.done)
        plen = np.asarray(st.prompt_len)
        finishing = [s[0] for r in live for s in r.slots if s is not None and done[s[0]]]
        seq = np.asarray(st.seq) if finishing or any(r.stream for r in live) else None
        lps = np.asarray(st.logprobs) if finishing and any(r.want_logprobs for r in live) else None
        beam = None
        if any(len(s) > 1 for s in [s for r in live for s in r.slots if s is not None] if s[0] in finishing):
            beam = {k: np.asarray(getattr(st.beam, k)) for k in ("fin_tokens", "fin_logprobs", "fin_len", "fin_mask")}
        now = time.monotonic()
        new_tokens = 0
        for r in live:
            steps = []   # (row, first new length, last length) for streaming
            for i, sl in enumerate(r.slots):
                if sl is None or r.row_done[i]:
                    continue
                h = sl[0]
                n = int(seq_len[h])
                base = max(r.sent[i], int(plen[h]))
                off = int(plen[h]) if self.encdec else 0   # T5 answers with the decoder's ids only
                if n > base:
                    new_tokens += (n - base) * len(sl)
                    if r.t_first is None:
                        r.t_first = now
                        if self.metrics:
                            self.metrics.first_token(self.model_name, now - r.t_arrival)
                    if r.stream:
                        steps.append((i, base - off, n - off, seq[h, off:n].tolist()))
                    r.sent[i] = n
                if done[h]:
                    r.row_done[i] = True
                    prompt = self._shown(r.rows[i])
                    if len(sl) > 1:   # beam group headed by slot h: finished hypotheses, best first
                        hyps = [(int(beam["fin_len"][h, b]), b) for b in range(len(sl))
                                if beam["fin_mask"][h, b] and beam["fin_len"][h, b] > 0]
                        r.result_seqs[i] = [prompt + beam["fin_tokens"][h, b, :m].tolist() for m, b in hyps] or [prompt]
                        r.result_lps[i] = [beam["fin_logprobs"][h, b, :m].astype(float).tolist() for m, b in hyps] or [[]]
                    else:
                        r.result_seqs[i] = [seq[h, off:n].tolist()]
                        if lps is not None:
                            r.result_lps[i] = [lps[h, plen[h]:n].astype(float).tolist()]
                    self._free.extend(sl)
                    r.slots[i] = None
            if steps:
                self._stream(r, steps)
            if all(r.row_done):
                r.finished = True
                self._live.remove(r)
                lp = [x if x is not None else [[]] for x in r.result_lps] if r.want_logprobs else None
                r.push(Update("done", seqs=r.result_seqs, logprobs=lp))
                if self.metrics:
                    gen = sum(len(x[0]) - len(self._shown(row)) for x, row in zip(r.result_seqs, r.rows))
                    self.metrics.request_done(self.model_name, True, now - r.t_arrival, gen, rows=len(r.rows))
        if self.metrics:
            self.metrics.tokens(self.model_name, new_tokens)
            self.metrics.occupancy(self.model_name, self.live_slots, self.B)

    def _stream(self, r: Request, steps):
        """One response per new token: every row's ids so far (FT's decoupled mode). Rows of a multi-row
        request advance together; a row that has finished repeats its last ids."""
        for i, row in enumerate(r.rows):
            r.last_seqs.setdefault(i, list(self._shown(row)))
        for t in range(1, max(n - b for _, b, n, _ in steps) + 1):
            for i, b, n, ids in steps:
                r.last_seqs[i] = ids[: min(b + t, n)]
            r.push(Update("token", seqs=[r.last_seqs[i] for i in range(len(r.rows))]))

    def _shown(self, row) -> list[int]:
        """What an answer repeats before the generated ids: GPT the prompt (FT's output_ids), T5 nothing."""
        return [] if self.encdec else row.prompt

    def _fail(self, r: Request, code: str, message: str):
        if r.finished:
            return
        r.finished = True
        r.push(Update("error", code=code, message=message))
        if self.metrics:
            self.metrics.request_done(self.model_name, False, time.monotonic() - r.t_arrival, 0)


def _width(params) -> int:
    return max(1, int(getattr(params, "beam_width", 1) or 1))
