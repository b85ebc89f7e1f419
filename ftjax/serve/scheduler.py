"""Continuous batching: one thread owns the engine and its decode state.

Each iteration of the scheduler thread:
  1. drops cancelled and timed-out requests (their slots are retired at once),
  2. dispatches `generate_snap(state, k)`: k = stream_chunk (1 here; the CLI's default is 4) while a stream is live
     (one response per token as soon as it exists), otherwise a small chunk so that new arrivals join
     soon; the call returns once its kernels are launched (JAX dispatch is asynchronous) with a small
     snapshot to come; slots whose rows must have ended by this call are freed at once (early release),
  3. admits waiting rows into free slots, first come first served (one `prefill_insert` call for all
     rows admitted this iteration; a request of several rows may be admitted across iterations); they
     join the next generate call. (With nothing decoding, or `admit_after_dispatch` off, the admit comes
     before step 2 instead.) Admitting after the dispatch overlaps the admit's host work with the
     device's steps (H100: serving 0.58 -> 0.67x offline at stream_chunk 4 in the old timed window),
  4. reads back the *previous* call's snapshot (seq_len, done, each row's last ids) while the device
     runs this one: new ids are appended on the host, streamed, finished requests completed.
  The host's per-token work (responses, gRPC) thus overlaps the device's decode steps. With
  `reader_thread` on, step 4 runs on a second thread as soon as each call ends (off by default: no gain
  beyond the benchmark's spread on the H100). `phase_s` counts the host seconds of each phase.
The scheduler owns its engine: the engine's host-side slot sets (beam heads, sampling slots) describe
this scheduler's state, so nothing else may run the same engine (e.g. `LLM.generate`) while it serves.
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

import jax
import numpy as np

log = logging.getLogger("ftjax.serve")

# What a request's own bad values raise on the host while its admit is prepared (before the engine's call takes
# the state): that request fails with INVALID_ARGUMENT, the others are admitted, the server goes on. Anything
# else an engine call raises is an engine failure.
REQUEST_ERRORS = (ValueError, OverflowError, TypeError)


class QueueFull(Exception):
    """The waiting queue is at --max-queue: RESOURCE_EXHAUSTED."""


@dataclasses.dataclass
class Update:
    """What a request's handler receives. kind: "tokens" (streaming: the ids each row gained since the
    last update; `StreamView` turns them into one response per token), "done", "error"."""
    kind: str
    seqs: list | None = None       # "done": per row, a list of beams (best first; one for sampling), each
                                   # prompt + generated ids (T5: generated ids only)
    new: list | None = None        # "tokens": per row, the new ids (possibly none)
    whole: list | None = None      # "tokens": per row, None, or (a beam search row) all its generated ids now: the
                                   # lead beam changes as the search goes on, so earlier ids may change too
    logprobs: list | None = None   # "done": per row, per beam, log prob of each generated token (when asked)
    code: str | None = None                    # "cancelled" | "deadline" | "invalid" | "internal" (errors)
    message: str = ""


class StreamView:
    """The handler's side of a stream: turns "tokens" updates into one `seqs` per token (every row's ids
    so far: FT's decoupled mode). Rows of a multi-row request advance together; a row without a new id
    at a token repeats its last ids. shown[i]: what row i's answers start with (GPT: the prompt)."""

    def __init__(self, shown: list[list[int]]):
        self.shown = [list(s) for s in shown]
        self.seqs = [list(s) for s in shown]

    def expand(self, new: list[list[int]], whole: list | None = None) -> list[list[list[int]]]:
        """whole[i] (beam search rows): the row's generated ids now, its last len(new[i]) the new ones; each
        response then shows a prefix of that current lead beam, never ids of a beam the search has dropped."""
        out = []
        for t in range(max((len(x) for x in new), default=0)):
            for i, ids in enumerate(new):
                if t >= len(ids):
                    continue
                if whole is not None and whole[i] is not None:
                    w = whole[i]
                    self.seqs[i] = self.shown[i] + [int(x) for x in w[: len(w) - len(ids) + t + 1]]
                else:
                    self.seqs[i].append(int(ids[t]))
            out.append([list(s) for s in self.seqs])
        return out


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
        self.row_done: list[bool] = [False] * len(rows)
        self.result_seqs: list[list[list[int]] | None] = [None] * len(rows)   # per row, per beam
        self.result_lps: list[list[list[float]] | None] = [None] * len(rows)
        self.next_row = 0                         # rows admitted so far (in order)
        self.gen: list[list[int]] = [[] for _ in rows]        # per row: generated ids read back so far
        self.gen_lp: list[list[float]] = [[] for _ in rows]   # and their log probs (when asked)
        self.valid_from = [0] * len(rows)     # per row: the first generate call whose snapshot shows it
        self.gen_bound = [0] * len(rows)      # per row: ids it will have generated once every dispatched call ran
        self.released: list[int | None] = [None] * len(rows)   # per row: the call by whose end it had to
                                                                # finish, once its slot went back to the free list
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
        self.B = self.engine.slots
        self.max_queue = max_queue
        self.chunk = max(1, int(chunk))
        # Decode steps per iteration while a stream is live: 1 sends each token as soon as it exists;
        # more amortise the host's per-iteration work (every token still gets its own response).
        self.stream_chunk = max(1, int(stream_chunk))
        self.metrics = metrics
        self.model_name = model_name
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: list[Request] = []
        self._admitting: list[Request] = []
        # One lock for the queue and all bookkeeping (slots, requests, updates). Re-entrant: the helpers take it
        # themselves and are also called with it held. Engine calls (dispatches) run without it.
        self._cv = threading.Condition(threading.RLock())
        self._stop = False
        self._free = list(range(self.B))
        self._ended: list[int] = []   # freed slots not yet passed to Engine.release_slots
        self._state = None
        self._inflight: collections.deque = collections.deque()   # (call index, snapshot) not yet read back
        self._ncalls = 0                                           # generate calls dispatched
        self._out: list = []                                       # updates of this iteration
        self.early_release = True   # free a slot as soon as its row must have ended (`_release_finishing`)
        # While rows are decoding, admit waiting requests right AFTER dispatching the next generate call, not
        # before it: the admit's host work (packing, dispatch) then overlaps the device's decode steps
        # instead of leaving the device idle between calls. An admitted request joins the call after.
        self.admit_after_dispatch = True
        # While rows decode, an admit call (prefill + insert: hundreds of kernels, milliseconds of host time
        # whatever its size) waits until it can take `admit_min_rows` rows, or until the oldest waiting
        # request has waited `admit_max_wait_s`; with nothing decoding it admits at once. 1 = every iteration.
        self.admit_min_rows = 1
        self.admit_max_wait_s = 0.02
        # Counters for benchmarks: decode steps dispatched, and the same weighted by the slots holding a
        # request at dispatch (their ratio over a window, divided by the slots, is the batch occupancy).
        self.steps_dispatched = 0
        self.slot_steps_dispatched = 0
        self.admit_calls = 0      # prefill + insert calls, and the rows they admitted
        self.rows_admitted = 0
        # Called once per iteration with [(request, update)]; the default pushes each one. An asyncio
        # front end replaces it with one hop into its event loop.
        self.deliver = self._deliver_each
        # Read back each generate call's snapshot on a second thread ("reader"): it waits for the call, turns
        # the snapshot into responses and hands them over while this thread dispatches the next calls and
        # admits (a dispatch spends most of its host time launching CUDA graphs, without the GIL). The
        # dispatch thread stays at most one unread call ahead, as without the reader. Read at start(). Off by
        # default: on the H100 (64 streaming clients, 350M) three A/Bs gave 0.90 -> 1.01, 0.94 -> 0.95 and
        # 0.98 -> 0.81 x offline, within the benchmark's run-to-run spread (bench/RESULTS.md).
        self.reader_thread = False
        self._reader: threading.Thread | None = None
        self._reader_q: queue.Queue = queue.Queue()
        self._reader_error: BaseException | None = None
        self._read_calls = 0                # generate calls whose snapshot has been processed
        self._flush_lock = threading.Lock()
        # Host seconds per phase, for benchmarks: dispatch (generate calls), admit (prefill + insert calls and
        # their bookkeeping), readback (waiting for a snapshot), process (snapshot -> updates), deliver.
        self.phase_s: dict[str, float] = collections.defaultdict(float)
        # Compiled before ready (`_warm_up`, ftjax addition): each kind ("greedy", "sampled", "penalized",
        # "sampled+penalized", "beam") as one request per prompt length of `warmup_lengths`, through the calls
        # a real request makes. () = nothing (the library default; `python -m ftjax.serve --warmup` sets it).
        self.warmup: tuple[str, ...] = ()
        self.warmup_lengths: tuple[int, ...] = (16,)
        self.warmup_s = 0.0            # seconds the warm-up took
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
            # max_queue counts requests that wait for a slot: those the free slots will take at the next
            # iteration do not (each takes at least one), so an idle server takes a burst of as many more
            if len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFull(f"request queue is full ({self.max_queue} waiting for a slot); retry later")
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
            if self.warmup:
                self._warm_up()
            if self.reader_thread:
                self._reader = threading.Thread(target=self._read_loop, name=self._thread.name + "-reader",
                                                daemon=True)
                self._reader.start()
            self.ready.set()
            while True:
                with self._cv:
                    if self._stop:
                        break
                    if self._reader_error is not None:
                        raise self._reader_error
                    idle = not self._live and not self._waiting
                    if self._reader is None:
                        if idle and not self._inflight:
                            self._cv.wait(timeout=0.5)
                            continue
                    elif idle or self._read_calls < self._ncalls - 1:
                        # nothing to do, or one unread call ahead already: the reader's progress wakes us
                        self._cv.wait(timeout=0.5 if idle else 0.05)
                        continue
                self._iteration()
                self._flush()
        except BaseException as e:  # noqa: BLE001 - the engine failed: fail everything, stop serving
            log.exception("scheduler failed")
            self.error = e
            self.ready.set()
            self._stop_reader()
            with self._cv:
                for r in dict.fromkeys(list(self._live) + list(self._waiting) + list(self._admitting)):
                    self._fail(r, "internal", f"engine failure: {e}")   # (a finished one is skipped)
        finally:
            with self._cv:
                self._stop = True
            self._stop_reader()   # it reads back (and answers) what was already dispatched
            with self._cv:
                pending = list(self._waiting)
                self._waiting.clear()
                for r in dict.fromkeys(pending + self._live + self._admitting):
                    if not r.finished:
                        self._fail(r, "unavailable", "server is shutting down")
            self._flush()

    def _warm_up(self):
        """Compiles, before the server reports ready, what the first request of each `warmup` kind would
        otherwise wait for (seconds on a GPU; nothing on a restart with the persistent compilation cache): a
        request at each prompt length of `warmup_lengths` goes through `prefill_insert` into the first slots,
        then, once per kind, the generate calls of `chunk` and `stream_chunk` steps run with it live, and the
        slots are retired. No request is live yet, so no other row is touched; the engine's host-side slot
        sets are back to empty afterwards."""
        t0 = time.perf_counter()
        eng = self.engine
        ks = sorted({self.chunk, self.stream_chunk})
        vocab = int(getattr(eng.cfg, "vocab", getattr(eng.cfg, "vocab_size", 2)))
        compiled = 0
        for kind in self.warmup:
            params = warmup_params(kind)
            width = params.beam_width
            if width > eng.max_beam_width:
                raise ValueError(f"warm-up kind {kind!r} needs beam width {width}, but the engine's "
                                 f"max_beam_width is {eng.max_beam_width}")
            slots = list(range(width))
            for j, length in enumerate(self.warmup_lengths):
                n = max(1, min(int(length), eng.S - max(ks) - 1))
                prompt = [2 + (7 * i) % max(1, vocab - 2) for i in range(n)]
                self._state = eng.prefill_insert(self._state, [prompt], [slots if width > 1 else slots[0]],
                                                 [max(ks) + 1], [params])
                compiled += 1
                if j == 0:
                    for k in ks:
                        self._state = eng.generate_snap(self._state, k)[0]
                        compiled += 1
                self._state = eng.retire(self._state, slots)
        jax.block_until_ready(self._state)
        self.warmup_s = time.perf_counter() - t0
        log.info("warm-up of %s: %d calls (prompt lengths %s, steps %s) in %.1f s", self.model_name, compiled,
                 ",".join(map(str, self.warmup_lengths)), ",".join(map(str, ks)), self.warmup_s)

    def _stop_reader(self):
        if self._reader is not None:
            self._reader_q.put(None)
            self._reader.join(timeout=60)
            self._reader = None

    def _read_loop(self):
        """Reader thread: each dispatched call's snapshot, in order -> `_process` -> hand-off."""
        while True:
            item = self._reader_q.get()
            if item is None:
                return
            try:
                self._read_back(*item)
                self._flush()
            except BaseException as e:  # noqa: BLE001 - the dispatch thread fails everything with it
                log.exception("scheduler reader failed")
                with self._cv:
                    self._reader_error = e
                    self._cv.notify_all()
                return

    def _iteration(self):
        """Dispatch, then read back: the device runs generate call j+1 while the host turns call j's
        snapshot into responses (JAX dispatch is asynchronous; only the snapshot's read-back waits)."""
        now = time.monotonic()
        with self._cv:
            self._drop_cancelled(now)
            late = self.admit_after_dispatch and any(not r.finished for r in self._live)
        if not late:
            self._admit(now)
        with self._cv:
            running = any(not r.finished for r in self._live)
            k = self.stream_chunk if any(r.stream for r in self._live) else self.chunk
        if running:
            self._release_ended()
            t0 = time.perf_counter()
            self._state, _, snap = self.engine.generate_snap(self._state, k)
            self.phase_s["dispatch"] += time.perf_counter() - t0
            with self._cv:
                j = self._ncalls
                self._ncalls += 1
                self.steps_dispatched += k
                self.slot_steps_dispatched += k * self.live_slots
                if self.early_release:
                    self._release_finishing(k)
            if self._reader is not None:
                self._reader_q.put((j, snap))
            else:
                self._inflight.append((j, snap))
        if late:
            self._admit(now)   # valid_from = the next call: the rows' first ids show in its snapshot
        while len(self._inflight) > (1 if running else 0):
            self._read_back(*self._inflight.popleft())

    def _read_back(self, j: int, snap):
        """Generate call j's snapshot: one read-back of its small arrays (waiting for the call, without the
        GIL), then `_process` under the lock; the reader thread's progress wakes the dispatch thread."""
        t0 = time.perf_counter()
        host = jax.device_get(snap)
        t1 = time.perf_counter()
        with self._cv:
            self._process(j, host)
            self._read_calls = j + 1
            self._cv.notify_all()
        self.phase_s["readback"] += t1 - t0
        self.phase_s["process"] += time.perf_counter() - t1

    def _release_finishing(self, k: int):
        """Frees, at once, the slot of every row certain to have finished by the end of the calls dispatched
        so far: a row generates one id per step until it ends, so once its ids after insert plus the steps
        dispatched since reach max_new, the last dispatched call ends it (earlier, if it met an end id).
        Its final ids are in that call's snapshot, taken before any later insert reuses the slot, so the
        next iteration can admit a waiting request there instead of leaving the slot idle until that
        snapshot has been read back (one pipelined iteration later). Beam groups end by their own rule
        and are not released early."""
        for r in self._live:
            for i, sl in enumerate(r.slots):
                if sl is None or len(sl) > 1 or r.row_done[i] or r.released[i] is not None:
                    continue
                r.gen_bound[i] += k
                if r.gen_bound[i] >= r.rows[i].max_new:
                    r.released[i] = self._ncalls - 1
                    self._free.extend(sl)
                    self._ended.extend(sl)

    def _drop_cancelled(self, now):
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled.is_set() or (r.deadline and now > r.deadline)]
            for r in gone:
                self._waiting.remove(r)
        retire = []
        for r in list(self._live):
            if r.cancelled.is_set() or (r.deadline and now > r.deadline):
                # a released row's slot may already hold another request: not this one's to retire
                retire += [x for i, s in enumerate(r.slots) if s is not None and r.released[i] is None for x in s]
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
            if (self.admit_min_rows > 1 and self._waiting and any(not r.finished for r in self._live)
                    and now - self._waiting[0].t_arrival < self.admit_max_wait_s
                    and min(len(self._free), sum(len(r.rows) - r.next_row for r in self._waiting)) < self.admit_min_rows):
                return []   # too few rows to be worth a call yet (see admit_min_rows)
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
        t0 = time.perf_counter()
        # taken off the waiting queue and not yet live: should the engine fail now, _run fails these too
        self._admitting = [r for r, _, _ in picks]
        try:
            out = self._admit_picks(now, picks)
        finally:
            self.phase_s["admit"] += time.perf_counter() - t0
        self._admitting = []   # kept when the admit raised: _run's handler answers them
        return out

    def _release_ended(self):
        """Tells the engine which freed slots' rows have ended (`Engine.release_slots`: its host-side slot sets,
        which choose the compiled variant of the next calls), so that a greedy batch stops running the
        sampling or penalty step of a request that finished. On the dispatch thread only, before any admit
        that could reuse those slots and before each generate call: every engine call keeps one thread and
        one order (a multi-host leader publishes them in that order)."""
        with self._cv:
            ended, self._ended = self._ended, []
        if ended:
            self.engine.release_slots(ended)

    def _admit_picks(self, now, picks) -> list[Request]:
        self._release_ended()
        reqs = list(dict.fromkeys(r for r, _, _ in picks))
        try:
            self._prefill([(r.rows[i], s) for r, i, s in picks])   # without the lock: the reader goes on
        except REQUEST_ERRORS:
            with self._cv:
                reqs = self._admit_one_by_one(picks, reqs)
        with self._cv:
            return self._admitted(now, picks, reqs)

    def _admit_one_by_one(self, picks, reqs) -> list[Request]:
        """One request's params did not fit (e.g. word-list capacity): admit one by one, fail the bad
        (the lock held)."""
        self._ensure_state()
        ok = []
        for r in reqs:
            mine = [(r.rows[i], s) for rr, i, s in picks if rr is r]
            try:
                self._prefill(mine)
                ok.append(r)
            except REQUEST_ERRORS as e:
                self._ensure_state()
                self._free.extend(x for rr, _, s in picks if rr is r for x in s)
                self._ended.extend(x for rr, _, s in picks if rr is r for x in s)
                if r in self._waiting:
                    self._waiting.remove(r)
                if r in self._live:   # rows of a request wider than the slots, admitted by earlier calls
                    self._live.remove(r)
                    retire = [x for i, sl in enumerate(r.slots) if sl is not None and r.released[i] is None
                              for x in sl]
                    if retire:
                        self._state = self.engine.retire(self._state, retire)
                        self._free.extend(retire)
                self._fail(r, "invalid", str(e))
        return ok

    def _admitted(self, now, picks, reqs) -> list[Request]:
        """Bookkeeping of an admit call (the lock held)."""
        self.admit_calls += 1
        self.rows_admitted += len(picks)
        for r, i, s in picks:
            if r in reqs:
                r.slots[i] = s
                # Snapshots of generate calls dispatched before this insert say nothing about this row.
                r.valid_from[i] = self._ncalls
                # generated ids after the insert: GPT's first id comes from prefill (beam: none yet; T5:
                # the decoder start id is pending)
                r.gen_bound[i] = 0 if (self.encdec or len(s) > 1) else 1
        for r in reqs:
            if r.t_admitted is None:
                # `now` is the loop iteration's clock, read before the waiting queue was: a request that
                # arrived since is admitted at its arrival (queue time 0, never negative).
                r.t_admitted = max(now, r.t_arrival)
                if self.metrics:
                    self.metrics.queue_time(self.model_name, r.t_admitted - r.t_arrival)
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
            self._inflight.clear()
            self._state = self.engine.init_state()

    def _process(self, j: int, snap: dict):
        """Generate call j's snapshot -> new ids per live row (appended on the host), stream updates,
        finished requests. Ids come from the snapshot's last-ids window, so nothing reads the state."""
        seq_len, done, tail, tail_lp = snap["seq_len"], snap["done"], snap["ids"], snap["logprobs"]
        W = tail.shape[1]
        now = time.monotonic()
        new_tokens = 0
        beam = None
        for r in list(self._live):
            if r.finished:
                continue
            steps = []   # rows with new ids (streaming)
            for i, sl in enumerate(r.slots):
                if sl is None or r.row_done[i]:
                    continue
                h = sl[0]
                if r.valid_from[i] > j:
                    continue
                if r.released[i] is not None and j > r.released[i]:   # cannot happen (see _release_finishing)
                    raise RuntimeError(f"slot {h}: released after call {r.released[i]} but not done by it")
                n = int(seq_len[h])
                new = n - self._known(r, i)
                if new > 0:
                    if new > W:   # cannot happen: the window covers every id one call can add
                        raise RuntimeError(f"slot {h}: {new} new ids but a window of {W}")
                    if len(sl) > 1 and "seq" in snap:
                        # a beam group's head row holds its lead running beam whole (rows are reordered each
                        # step): take all its generated ids, not only the newest (earlier ones may have changed)
                        r.gen[i] = snap["seq"][h, n - len(r.gen[i]) - new: n].tolist()
                    else:
                        r.gen[i].extend(tail[h, W - new:].tolist())
                    if r.want_logprobs:
                        r.gen_lp[i].extend(tail_lp[h, W - new:].tolist())
                    new_tokens += new * len(sl)
                    if r.t_first is None:
                        r.t_first = now
                        if self.metrics:
                            self.metrics.first_token(self.model_name, now - r.t_arrival)
                    if r.stream:
                        steps.append((i, new))
                if done[h]:
                    r.row_done[i] = True
                    prompt = self._shown(r.rows[i])
                    if len(sl) > 1:   # beam group headed by slot h: finished hypotheses, best first
                        if beam is None:   # the call's own snapshot carries them (a call runs with the beam
                            beam = {k: np.asarray(snap[k])   # step while a group is live): no state read
                                    for k in ("fin_tokens", "fin_logprobs", "fin_len", "fin_mask")}
                        hyps = [(int(beam["fin_len"][h, b]), b) for b in range(len(sl))
                                if beam["fin_mask"][h, b] and beam["fin_len"][h, b] > 0]
                        r.result_seqs[i] = [prompt + beam["fin_tokens"][h, b, :m].tolist() for m, b in hyps] or [prompt]
                        r.result_lps[i] = [beam["fin_logprobs"][h, b, :m].astype(float).tolist() for m, b in hyps] or [[]]
                        if hyps:   # the last streamed ids: the best finished beam, not a running one (at the
                            r.gen[i] = r.result_seqs[i][0][len(prompt):]   # last step every candidate finished)
                    else:
                        r.result_seqs[i] = [prompt + r.gen[i]]
                        if r.want_logprobs:
                            r.result_lps[i] = [[float(x) for x in r.gen_lp[i]]]
                    if r.released[i] is None:
                        self._free.extend(sl)
                        self._ended.extend(sl)
                    r.slots[i] = None
            if steps:
                self._stream(r, steps)
            if all(r.row_done):
                r.finished = True
                self._live.remove(r)
                lp = [x if x is not None else [[]] for x in r.result_lps] if r.want_logprobs else None
                self._emit(r, Update("done", seqs=r.result_seqs, logprobs=lp))
                if self.metrics:
                    gen = sum(len(x[0]) - len(self._shown(row)) for x, row in zip(r.result_seqs, r.rows))
                    self.metrics.request_done(self.model_name, True, now - r.t_arrival, gen, rows=len(r.rows))
        if self.metrics:
            self.metrics.tokens(self.model_name, new_tokens)
            self.metrics.occupancy(self.model_name, self.live_slots, self.B)

    def _known(self, r: Request, i: int) -> int:
        """Row i's seq_len as read back so far: its start (T5: the decoder start id; GPT: the prompt) and
        the ids appended since."""
        return (1 if self.encdec else len(r.rows[i].prompt)) + len(r.gen[i])

    def _stream(self, r: Request, steps):
        """One "tokens" update per request per iteration: each row's new ids (the handler expands them)."""
        new = [[] for _ in r.rows]
        whole = None
        for i, n in steps:
            new[i] = r.gen[i][len(r.gen[i]) - n:]
            if r.rows[i].params.beam_width > 1:   # beam search: the lead beam (at its end, the answer) whole
                whole = whole or [None] * len(r.rows)
                whole[i] = list(r.gen[i])
        self._emit(r, Update("tokens", new=new, whole=whole))

    def _shown(self, row) -> list[int]:
        """What an answer repeats before the generated ids: GPT the prompt (FT's output_ids), T5 nothing."""
        return [] if self.encdec else row.prompt

    def _emit(self, r: Request, u: Update):
        self._out.append((r, u))

    def _flush(self):
        """Hands this iteration's updates to the handlers in one batch (`deliver`). Both threads flush; the
        flush lock keeps the batches in the order their updates were made."""
        with self._flush_lock:
            with self._cv:
                if not self._out:
                    return
                items, self._out = self._out, []
            t0 = time.perf_counter()
            self.deliver(items)
            self.phase_s["deliver"] += time.perf_counter() - t0

    @staticmethod
    def _deliver_each(items):
        for r, u in items:
            r.push(u)

    def _fail(self, r: Request, code: str, message: str):
        if r.finished:
            return
        r.finished = True
        self._emit(r, Update("error", code=code, message=message))
        if self.metrics:
            self.metrics.request_done(self.model_name, False, time.monotonic() - r.t_arrival, 0)


WARMUP_KINDS = ("greedy", "sampled", "penalized", "sampled+penalized", "beam")


def warmup_params(kind: str):
    """The SamplingParams of a warm-up request of this kind: each kind is one compiled variant of the calls
    (greedy or sampling, with or without the per-step processors, beam search)."""
    from ftjax.sampling import SamplingParams

    table = {"greedy": SamplingParams(), "sampled": SamplingParams(top_k=4, random_seed=1),
             "penalized": SamplingParams(repetition_penalty=1.1),
             "sampled+penalized": SamplingParams(top_k=4, random_seed=1, repetition_penalty=1.1),
             "beam": SamplingParams(beam_width=2)}
    if kind not in table:
        raise ValueError(f"warm-up kind {kind!r} is not one of {', '.join(WARMUP_KINDS)}")
    return table[kind]


def _width(params) -> int:
    return max(1, int(getattr(params, "beam_width", 1) or 1))
