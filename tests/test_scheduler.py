"""The scheduler without gRPC: few slots, many requests of known lengths. Every request's answer equals the
library's `generate` of it alone (the oracle), and a slot whose row must have ended is reused without
waiting for that row's snapshot (fewer generate calls for the same work); admitting before or after the
next generate call's dispatch gives the same answers."""
import numpy as np
import pytest

import ftjax
from ftjax.config import ModelConfig
from ftjax.models import gpt
from ftjax.serve.scheduler import Request, Scheduler
from ftjax.serve.tensors import Row


@pytest.fixture(scope="module")
def llm():
    cfg = ModelConfig(vocab_size=200, max_positions=64, hidden=32, num_layers=2, num_heads=2, ffn_dim=64,
                      bos_id=0, eos_id=1)
    return ftjax.LLM(cfg, gpt.init_params(cfg, seed=int(np.random.randint(1000))), dtype="float32",
                     attention="xla", max_batch_size=2, max_seq_len=48)


def _serve(llm, jobs, early: bool, stream_chunk: int, admit_after: bool = True, admit_min_rows: int = 1,
           reader: bool = False):
    sched = Scheduler(llm, chunk=4, stream_chunk=stream_chunk)
    sched.early_release = early
    sched.admit_after_dispatch = admit_after
    sched.admit_min_rows = admit_min_rows
    sched.reader_thread = reader
    sched.start()
    try:
        reqs = []
        for prompt, n, stream in jobs:
            params = llm.sampling_params(1, end_id=None)[0]
            reqs.append(sched.submit(Request([Row(prompt, n, params)], stream=stream)))
        out = []
        for r in reqs:
            while True:
                u = r.get(timeout=120)
                assert u.kind != "error", u.message
                if u.kind == "done":
                    out.append(u.seqs[0][0])
                    break
        # the benchmark counters: every dispatched step counted, with at most B slots held at each
        assert sched.steps_dispatched >= max(n for _, n, _ in jobs) - 1
        assert 0 < sched.slot_steps_dispatched <= sched.steps_dispatched * sched.B
        assert 0 < sched.admit_calls <= sched.rows_admitted == len(jobs)
        # host time per phase: every phase ran, none took longer than the whole
        assert all(0 < sched.phase_s[k] for k in ("dispatch", "admit", "readback", "process", "deliver")), \
            dict(sched.phase_s)
        return out, sched._ncalls
    finally:
        sched.stop()


@pytest.mark.parametrize("stream_chunk,reader", [(1, False), (4, False), (4, True)])
def test_slots_reused_early_answers_unchanged(llm, stream_chunk, reader):
    rng = np.random.RandomState(np.random.randint(1 << 20))
    jobs = [(rng.randint(2, 200, size=rng.randint(2, 9)).tolist(), int(rng.randint(1, 14)), k % 2 == 0)
            for k in range(7)]
    got_early, calls_early = _serve(llm, jobs, True, stream_chunk, reader=reader)
    got_late, calls_late = _serve(llm, jobs, False, stream_chunk, reader=reader)
    for (prompt, n, _), a, b in zip(jobs, got_early, got_late):
        ref = prompt + llm.generate([prompt], max_new_tokens=n, end_id=None).tokens[0]
        assert a == ref and b == ref
    if not reader:   # one thread: a late-released slot waits one pipelined iteration, so early release saves
        assert calls_early < calls_late, (calls_early, calls_late)   # calls (the reader's timing varies)


def test_admit_before_or_after_dispatch_same_answers(llm):
    """Admitting while rows decode, before the next generate call or right after dispatching it (the
    default), or only once 2 rows can go in one admit call: every answer is the reference each way, with
    2 slots and more requests than slots."""
    rng = np.random.RandomState(np.random.randint(1 << 20))
    jobs = [(rng.randint(2, 200, size=rng.randint(2, 9)).tolist(), int(rng.randint(1, 14)), k % 3 == 0)
            for k in range(6)]
    after, _ = _serve(llm, jobs, True, 2, admit_after=True)
    before, _ = _serve(llm, jobs, True, 2, admit_after=False)
    batched, _ = _serve(llm, jobs, True, 2, admit_min_rows=2)   # admits wait for 2 rows (or 20 ms)
    for (prompt, n, _), a, b, c in zip(jobs, after, before, batched):
        ref = prompt + llm.generate([prompt], max_new_tokens=n, end_id=None).tokens[0]
        assert a == ref and b == ref and c == ref


def test_reader_thread_same_answers_beam_and_streams(llm):
    """With the snapshot read back on a second thread: greedy and streamed requests, and a beam request
    (its finished hypotheses come in the call's snapshot, not from the donated state) all equal the
    library's answers; every streamed token arrives once, in order. (The references are computed before
    the scheduler starts: a scheduler owns its engine, whose host-side slot sets `generate` would change.)"""
    rng = np.random.RandomState(np.random.randint(1 << 20))
    jobs = [(rng.randint(2, 200, size=rng.randint(2, 9)).tolist(), int(rng.randint(2, 12)), k % 2 == 1)
            for k in range(5)]
    refs = [prompt + llm.generate([prompt], max_new_tokens=n, end_id=None).tokens[0] for prompt, n, _ in jobs]
    bprompt = rng.randint(2, 200, size=5).tolist()
    want = llm.generate([bprompt], max_new_tokens=6, end_id=None, beam_width=2).beams[0]
    sched = Scheduler(llm, chunk=4, stream_chunk=2)
    sched.reader_thread = True
    sched.start()
    try:
        reqs = [sched.submit(Request([Row(p, n, llm.sampling_params(1, end_id=None)[0])], stream=st))
                for p, n, st in jobs]
        bparams = llm.sampling_params(1, end_id=None, beam_width=2)[0]
        breq = sched.submit(Request([Row(bprompt, 6, bparams)]))
        for (prompt, n, stream), r, ref in zip(jobs, reqs, refs):
            streamed = []
            while True:
                u = r.get(timeout=120)
                assert u.kind != "error", u.message
                if u.kind == "tokens":
                    streamed += u.new[0]
                if u.kind == "done":
                    break
            assert u.seqs[0][0] == ref
            if stream:
                assert prompt + streamed == ref
        u = breq.get(timeout=120)
        assert u.kind == "done", u.message
        assert [s[len(bprompt):] for s in u.seqs[0]] == want
    finally:
        sched.stop()


def test_queue_time_never_negative(llm):
    """The admit bookkeeping gets the loop's clock, read before the waiting queue: a request that arrived
    after it is admitted at its arrival (its queue time 0), not before it."""
    import time

    sched = Scheduler(llm, chunk=4, stream_chunk=1)
    params = llm.sampling_params(1, end_id=None)[0]
    now = time.monotonic()
    early, late = Request([Row([5, 6], 2, params)]), Request([Row([7], 2, params)])
    early.t_arrival = now - 0.5
    late.t_arrival = now + 0.25
    with sched._cv:
        sched._admitted(now, [], [early, late])
    assert early.t_admitted == now and late.t_admitted == late.t_arrival


def test_warm_up_compiles_first_requests_and_changes_no_answer(llm):
    """A scheduler with a warm-up (`python -m ftjax.serve --warmup`): once ready, a greedy, a sampled and a
    penalised request of prompts in the warmed bucket, each alone, one of them streamed, compile nothing more (the engine's jit caches keep
    their sizes), and every answer equals the library's on an engine that never warmed up (the warm-up's
    rows leave no trace in the state or in the engine's slot sets). The penalised request comes after the
    sampled one has finished: its step is the penalised greedy one, not sampled + penalised (the scheduler
    tells the engine which slots' rows ended, `Engine.release_slots`)."""
    from ftjax.sampling import SamplingParams
    from ftjax.serve.scheduler import warmup_params

    rng = np.random.RandomState(np.random.randint(1 << 20))
    kinds = [SamplingParams(end_id=None), SamplingParams(top_k=5, random_seed=int(rng.randint(1 << 30)), end_id=None),
             SamplingParams(repetition_penalty=1.3, end_id=None)]
    jobs = [(rng.randint(2, 200, size=rng.randint(2, 17)).tolist(), int(rng.randint(2, 10)), p) for p in kinds]
    refs = [prompt + llm.generate([prompt], max_new_tokens=n, params=p).tokens[0] for prompt, n, p in jobs]
    fresh = ftjax.LLM(llm.cfg, llm.engine.params, dtype="float32", attention="xla", max_batch_size=2, max_seq_len=48)
    eng = fresh.engine
    sched = Scheduler(fresh, chunk=4, stream_chunk=4)
    sched.warmup, sched.warmup_lengths = ("greedy", "sampled", "penalized"), (5,)
    sched.start()
    try:
        assert sched.ready.wait(300) and sched.error is None, sched.error
        assert sched.warmup_s > 0
        assert not (eng._sampled_slots or eng._penalized_slots or eng._beam_heads)
        sizes = (eng._admit._cache_size(), eng._generate._cache_size(), eng._retire._cache_size())
        assert sizes[0] >= 2 and sizes[1] >= 3   # the prompt bucket x (greedy, sampled); 3 kinds x 1 step count
        for k, ((prompt, n, p), ref) in enumerate(zip(jobs, refs)):
            r = sched.submit(Request([Row(prompt, n, p)], stream=k == 1))
            while True:
                u = r.get(timeout=120)
                assert u.kind != "error", u.message
                if u.kind == "done":
                    break
            assert u.seqs[0][0] == ref, (k, u.seqs[0][0], ref)
        assert (eng._admit._cache_size(), eng._generate._cache_size(), eng._retire._cache_size()) == sizes
    finally:
        sched.stop()
    with pytest.raises(ValueError, match="warm-up kind 'fast'"):
        warmup_params("fast")


MARK = 199   # a prompt holding this id makes the wrapped admit below raise on the host


def _poisoned(llm, exc):
    """llm's engine, its prefill_insert raising `exc` (before any device work) for a prompt holding MARK."""
    real = llm.engine.prefill_insert

    def admit(state, prompts, *a, **k):
        if any(MARK in list(p) for p in prompts):
            raise exc
        return real(state, prompts, *a, **k)
    llm.engine.prefill_insert = admit
    return real


def _answer(r, timeout=120):
    while True:
        u = r.get(timeout=timeout)
        if u.kind in ("done", "error"):
            return u


def test_a_request_failing_its_admit_fails_alone_and_frees_its_slots(llm):
    """A host-side error while one request's admit is prepared (e.g. a value that overflows int32) answers
    that request INVALID and no other: the requests beside it complete as the library decodes them alone,
    a request wider than the slots whose later row fails gives back the slots its earlier rows held, and the
    scheduler goes on serving."""
    real = _poisoned(llm, OverflowError("min_length: Python integer out of bounds for int32"))
    sched = Scheduler(llm, chunk=4)
    sched.start()
    try:
        params = llm.sampling_params(1, end_id=None)[0]
        rng = np.random.RandomState(3)
        good = [rng.randint(2, 190, size=5).tolist() for _ in range(3)]
        a = sched.submit(Request([Row(good[0], 6, params)]))
        bad = sched.submit(Request([Row([5, MARK, 7], 6, params)]))
        # three rows on two slots: rows 0 and 1 are admitted, then row 2 fails
        wide = sched.submit(Request([Row(good[1], 9, params), Row(good[2], 9, params), Row([MARK, 3], 4, params)]))
        c = sched.submit(Request([Row(good[2], 5, params)]))
        assert _answer(bad).code == "invalid"
        assert _answer(wide).code == "invalid"
        for r, p, n in ((a, good[0], 6), (c, good[2], 5)):
            u = _answer(r)
            assert u.kind == "done", u.message
            assert u.seqs[0][0] == p + llm.generate([p], max_new_tokens=n, end_id=None).tokens[0]
        d = sched.submit(Request([Row(good[1], 3, params)]))
        assert _answer(d).kind == "done"
        with sched._cv:
            assert sorted(sched._free) == list(range(sched.B)) and not sched._live
    finally:
        sched.stop()
        llm.engine.prefill_insert = real


def test_an_engine_failure_while_admitting_answers_the_admitted_request(llm):
    """Any other error in an admit is an engine failure: every request gets an answer (none hangs), including
    the one taken off the queue for that admit."""
    real = _poisoned(llm, RuntimeError("device lost"))
    sched = Scheduler(llm, chunk=4)
    sched.start()
    try:
        params = llm.sampling_params(1, end_id=None)[0]
        r = sched.submit(Request([Row([4, MARK], 5, params)]))
        u = _answer(r, timeout=60)
        assert u.kind == "error" and u.code == "internal" and "device lost" in u.message
    finally:
        sched.stop()
        llm.engine.prefill_insert = real


def test_streamed_beam_search_shows_the_lead_beam_whole(llm):
    """A streamed beam request: each response is the lead running beam at that step, whole (the engine's head
    row after each single step is the reference), not earlier responses with the newest id appended (which
    joined pieces of beams the search had dropped)."""
    from ftjax.serve.scheduler import StreamView

    eng = llm.engine
    params = llm.sampling_params(1, beam_width=2, end_id=None)[0]
    rng = np.random.RandomState(8)
    checked = 0
    for _ in range(3):
        prompt, n = rng.randint(2, 190, size=6).tolist(), 9
        st = eng.prefill_insert(eng.init_state(), [prompt], [[0, 1]], [n], [params])
        leads = []
        for _ in range(n):
            st, _ = eng.generate_steps(st, 1)
            seq, L = np.asarray(st.seq), int(np.asarray(st.seq_len)[0])
            leads.append(seq[0, len(prompt):L].tolist())
        eng.release_slots([0, 1])
        sched = Scheduler(llm, chunk=4, stream_chunk=1)
        sched.start()
        try:
            r = sched.submit(Request([Row(prompt, n, params)], stream=True))
            view, streamed = StreamView([prompt]), []
            while True:
                u = r.get(timeout=120)
                assert u.kind != "error", u.message
                if u.kind == "done":
                    break
                streamed += [s[0][len(prompt):] for s in view.expand(u.new, u.whole)]
        finally:
            sched.stop()
        # every step but the last: the lead running beam; the last (every candidate finished): the answer
        assert streamed[:-1] == leads[: len(streamed) - 1] and len(streamed) == n, (streamed, leads)
        assert streamed[-1] == u.seqs[0][0][len(prompt):]
        # the lead beam changed its earlier ids somewhere (else appending would have been right too)
        checked += any(a != b[: len(a)] for a, b in zip(leads, leads[1:]))
    assert checked >= 1
