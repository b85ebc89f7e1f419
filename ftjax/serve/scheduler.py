"""Continuous batching: one thread owns the engine and its decode state.

Each iteration of the scheduler thread:
  1. drops cancelled and timed-out requests (their slots are retired at once),
  2. admits waiting rows into free slots, first come first served (one `prefill_insert` call for all
     rows admitted this iteration; a request of several rows may be admitted across iterations),
  3. runs `generate_steps(state, k)`: k = 1 while a streaming request is live (one response per token
     as soon as it exists), otherwise a small chunk so that new arrivals join soon,
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
from typing import Any, Callable

import numpy as np

log = logging.getLogger("ftjax.serve")


class QueueFull(Exception):
    """The waiting queue is at --max-queue: RESOURCE_EXHAUSTED."""


@dataclasses.dataclass
class Update:
    """What a request's handler receives. kind: "token" (streaming, one new token), "done", "error"."""
    kind: str
    seqs: list[list[int]] | None = None        # prompt + generated so far / final, per row
    logprobs: list[list[float]] | None = None  # per generated token, per row (final only, or when asked)
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
        self.slots: list[int | None] = [None] * len(rows)
        self.sent: list[int] = [0] * len(rows)    # seq_len reported so far per row (streaming)
        self.row_done: list[bool] = [False] * len(rows)
        self.result_seqs: list[list[int] | None] = [None] * len(rows)
        self.result_lps: list[list[float] | None] = [None] * len(rows)
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
    def __init__(self, llm, *, max_queue: int = 1024, chunk: int = 8, metrics=None, model_name: str = "fastertransformer"):
        self.llm = llm
        self.engine = llm.engine
        self.B = self.engine.B
        self.max_queue = max_queue
        self.chunk = max(1, int(chunk))
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
        k = 1 if any(r.stream for r in live) else self.chunk
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
                retire += [s for s in r.slots if s is not None]
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
        picks: list[tuple[Request, int, int]] = []   # (request, row index, slot)
        with self._cv:
            while self._free and self._waiting:
                r = self._waiting[0]
                i = r.next_row
                slot = self._free.pop(0)
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
                    self._free.extend(s for rr, _, s in picks if rr is r)
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
        self._state = self.engine.prefill_insert(self._state, prompts, [s for _, s in items],
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
        need_seq = any(r.stream for r in live) or any(
            done[s] for r in live for s in r.slots if s is not None)
        seq = np.asarray(st.seq) if need_seq else None
        lps = np.asarray(st.logprobs) if need_seq and any(r.want_logprobs for r in live) else None
        plen = np.asarray(st.prompt_len)
        now = time.monotonic()
        new_tokens = 0
        for r in live:
            stream_steps = []
            for i, s in enumerate(r.slots):
                if s is None or r.row_done[i]:
                    continue
                n = int(seq_len[s])
                base = max(r.sent[i], int(plen[s]))
                if n > base:
                    new_tokens += n - base
                    if r.t_first is None:
                        r.t_first = now
                        if self.metrics:
                            self.metrics.first_token(self.model_name, now - r.t_arrival)
                    if r.stream:
                        stream_steps.append((i, base, n))
                    r.sent[i] = n
                if done[s]:
                    r.row_done[i] = True
                    r.result_seqs[i] = seq[s, :n].tolist()
                    if lps is not None:
                        r.result_lps[i] = lps[s, plen[s]:n].astype(float).tolist()
                    self._free.append(s)
                    r.slots[i] = None
            if r.stream:
                self._stream(r, stream_steps, seq)
            if all(r.row_done):
                r.finished = True
                self._live.remove(r)
                r.push(Update("done", seqs=r.result_seqs, logprobs=r.result_lps if r.want_logprobs else None))
                if self.metrics:
                    self.metrics.request_done(self.model_name, True, now - r.t_arrival,
                                              sum(len(x) - len(row.prompt) for x, row in zip(r.result_seqs, r.rows)))
        if self.metrics:
            self.metrics.tokens(self.model_name, new_tokens)
            self.metrics.occupancy(self.model_name, self.live_slots, self.B)

    def _stream(self, r: Request, steps, seq):
        """One response per new token: the rows' ids so far (a row of a multi-row request that has no
        new token at this position repeats its current ids)."""
        if not steps:
            return
        cur = {}
        for i in range(len(r.rows)):
            if r.result_seqs[i] is not None and not any(j == i for j, _, _ in steps):
                cur[i] = r.result_seqs[i]
        # emit token by token, interleaving rows by position offset
        max_new = max(n - b for _, b, n in steps)
        for t in range(1, max_new + 1):
            seqs = []
            for i, row in enumerate(r.rows):
                st = next(((b, n) for j, b, n in steps if j == i), None)
                slot_seq = None
                if st is not None:
                    b, n = st
                    upto = min(b + t, n)
                    src = r.result_seqs[i] if r.result_seqs[i] is not None else None
                    slot_seq = (src[:upto] if src is not None else None)
                    if slot_seq is None:
                        slot = r.slots[i]
                        slot_seq = seq[slot, :upto].tolist()
                    r.last_seqs[i] = slot_seq
                else:
                    slot_seq = r.last_seqs.get(i) or cur.get(i) or list(row.prompt)
                seqs.append(slot_seq)
            r.push(Update("token", seqs=seqs))

    def _fail(self, r: Request, code: str, message: str):
        if r.finished:
            return
        r.finished = True
        r.push(Update("error", code=code, message=message))
        if self.metrics:
            self.metrics.request_done(self.model_name, False, time.monotonic() - r.t_arrival, 0)
