"""The gRPC server through the real `tritonclient.grpc`: a tiny GPT-2 served in-process on a free port.

The oracle is the library (`llm.generate` on the same prompts and params); servers bind 127.0.0.1 on
free ports, every wait is bounded, every server is stopped.
"""
import queue
import threading
import time
import urllib.request

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import infer_input as _t  # noqa: E402
from conftest import make_hf_gpt2  # noqa: E402

SEQ = 128
NAME = "fastertransformer"


@pytest.fixture(scope="module", params=[1, 2], ids=["in-process", "2-frontends"])
def served(tmp_path_factory, request):
    """The service in this process, and in 2 front-end processes sharing the port (--frontends 2)."""
    from ftjax.serve.server import Server, load_models

    path = str(tmp_path_factory.mktemp("serve_gpt2"))
    make_hf_gpt2(path, n_positions=SEQ, eos=7)
    models = load_models(model=path, dtype="float32", max_batch_size=8, max_seq_len=SEQ, attention="xla")
    srv = Server(models, grpc_port=0, metrics_port=0, chunk=4, frontends=request.param).start()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    yield srv, client, models[0].llm
    client.close()
    srv.stop()


def ft_inputs(prompts, out_len, **extra):
    """FT GPT tensors for prompts (right-padded) and per-row scalars in extra {name: (values, dtype)}."""
    b, L = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, L), np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    out = np.asarray(out_len if isinstance(out_len, (list, tuple)) else [out_len] * b, np.uint32).reshape(b, 1)
    ins = [_t("input_ids", ids, "UINT32"), _t("input_lengths", np.array([[len(p)] for p in prompts], np.uint32), "UINT32"),
           _t("request_output_len", out, "UINT32")]
    np_dt = {"UINT32": np.uint32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_, "INT32": np.int32}
    for name, (vals, dt) in extra.items():
        a = np.asarray(vals, np_dt[dt])
        if a.ndim <= 1 and name not in ("stop_words_list", "bad_words_list"):
            a = (np.full((b, 1), a.item(), np_dt[dt]) if a.ndim == 0 else a.reshape(b, 1))
        ins.append(_t(name, a, dt))
    return ins


def rows(result):
    ids, lens = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    return [ids[i, 0, : lens[i, 0]].tolist() for i in range(ids.shape[0])]


def test_sync_infer_equals_generate(served):
    srv, client, llm = served
    prompts = [[5, 6, 7, 8, 9], [11, 12], [100, 3, 4, 50, 60, 70, 80]]
    r = client.infer(NAME, ft_inputs(prompts, 12, is_return_log_probs=(True, "BOOL")))
    ref = llm.generate(prompts, max_new_tokens=12, return_log_probs=True)
    assert rows(r) == [p + t for p, t in zip(prompts, ref.tokens)]
    assert r.as_numpy("output_ids").shape[:2] == (3, 1) and r.as_numpy("output_ids").dtype == np.uint32
    np.testing.assert_allclose(r.as_numpy("cum_log_probs")[:, 0], ref.cum_log_probs, rtol=1e-4, atol=1e-4)
    olp = r.as_numpy("output_log_probs")
    for i, lp in enumerate(ref.output_log_probs):
        np.testing.assert_allclose(olp[i, 0, : len(lp)], lp, rtol=1e-4, atol=1e-4)
    # sampling params, and the typed `contents` encoding through the raw stub
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg
    import grpc

    req = pb.ModelInferRequest(model_name=NAME)
    for name, dt, shape, field, vals in [
            ("input_ids", "UINT32", [1, 3], "uint_contents", [40, 41, 42]),
            ("input_lengths", "UINT32", [1, 1], "uint_contents", [3]),
            ("request_output_len", "UINT32", [1, 1], "uint_contents", [9]),
            ("runtime_top_k", "UINT32", [1, 1], "uint_contents", [5]),
            ("temperature", "FP32", [1, 1], "fp32_contents", [0.7]),
            ("random_seed", "UINT64", [1, 1], "uint64_contents", [1234])]:
        t = req.inputs.add(name=name, datatype=dt, shape=shape)
        getattr(t.contents, field).extend(vals)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        resp = pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
    res = grpcclient.InferResult(resp)
    ref = llm.generate([[40, 41, 42]], max_new_tokens=9, top_k=5, temperature=0.7, random_seed=1234)
    assert rows(res) == [[40, 41, 42] + ref.tokens[0]]


def test_stream_one_response_per_token_then_final(served):
    srv, client, llm = served
    prompt = [20, 21, 22, 23]
    exp = llm.generate([prompt], max_new_tokens=10).tokens[0]
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(NAME, ft_inputs([prompt], 10), request_id="s1")
        got = []
        while True:
            result, error = q.get(timeout=60)
            assert error is None, error
            resp = result.get_response()
            assert resp.id == "s1"
            final = resp.parameters["triton_final_response"].bool_param
            got.append((rows(result)[0], final))
            if final:
                break
    finally:
        client.stop_stream()
    partial = [g for g, f in got if not f]
    assert len(partial) == len(exp)                       # one response per generated token
    assert partial == [prompt + exp[: k + 1] for k in range(len(exp))]
    assert got[-1] == (prompt + exp, True)


def test_32_concurrent_clients_mixed(served):
    srv, client, llm = served
    rng = np.random.RandomState(0)
    jobs = []
    for k in range(32):
        n = int(rng.randint(1, 3))
        prompts = [rng.randint(1, 200, size=rng.randint(1, 20)).tolist() for _ in range(n)]
        out = int(rng.choice([1, 5, 11, 23]))   # a few output lengths: fewer step counts to compile (suite time)
        kind = k % 4
        kw = {} if kind == 0 else {"top_k": 4, "random_seed": 100 + k} if kind == 1 else \
             {"top_p": 0.8, "temperature": 0.9, "random_seed": 7 * k} if kind == 2 else {"repetition_penalty": 1.3}
        jobs.append((prompts, out, kw, k % 3 == 0))
    tensor = {"top_k": ("runtime_top_k", "UINT32"), "top_p": ("runtime_top_p", "FP32"), "temperature": ("temperature", "FP32"),
              "random_seed": ("random_seed", "UINT64"), "repetition_penalty": ("repetition_penalty", "FP32")}
    results, errors = [None] * 32, []

    def run(k):
        prompts, out, kw, stream = jobs[k]
        ins = ft_inputs(prompts, out, **{tensor[a][0]: (v, tensor[a][1]) for a, v in kw.items()})
        try:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
            if stream:
                q = queue.Queue()
                c.start_stream(callback=lambda result, error: q.put((result, error)))
                c.async_stream_infer(NAME, ins)
                n = 0
                while True:
                    result, error = q.get(timeout=120)
                    if error is not None:
                        raise error
                    n += 1
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        results[k] = (rows(result), n)
                        break
                c.stop_stream()
            else:
                results[k] = (rows(c.infer(NAME, ins, client_timeout=120)), None)
            c.close()
        except Exception as e:  # noqa: BLE001
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    # The reference: one library call per output length, every job's rows with their own params (rows are
    # independent of their batch-mates, test_decoding.py; fewer programs to compile than a call a job).
    ref = [None] * len(jobs)
    for out in sorted({j[1] for j in jobs}):
        ks = [k for k in range(len(jobs)) if jobs[k][1] == out]
        params = [sp for k in ks for sp in llm.sampling_params(len(jobs[k][0]), **jobs[k][2])]
        toks = llm.generate([p for k in ks for p in jobs[k][0]], max_new_tokens=out, params=params).tokens
        for k in ks:
            ref[k], toks = toks[: len(jobs[k][0])], toks[len(jobs[k][0]):]
    for k, (prompts, out, kw, stream) in enumerate(jobs):
        got, n = results[k]
        assert got == [p + t for p, t in zip(prompts, ref[k])], (k, kw)
        if stream:
            assert n == max(len(t) for t in ref[k]) + 1


def _slow(llm, delay):
    """Wrap the engine's generate_steps so that a step takes at least `delay` seconds."""
    eng = llm.engine
    orig = eng.generate_steps

    def slow(state, n, **kw):
        time.sleep(delay)
        return orig(state, n, **kw)

    eng.generate_steps = slow
    return lambda: setattr(eng, "generate_steps", orig) if eng.generate_steps is slow else None


def test_short_request_overtakes_long(served):
    srv, client, llm = served
    restore = _slow(llm, 0.01)
    try:
        done = {}
        q = queue.Queue()
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(NAME, ft_inputs([[3, 4]], 120, end_id=(0, "UINT32"), min_length=(120, "UINT32")))
        first, err = q.get(timeout=60)                    # the long one is running
        assert err is None, err
        r = client.infer(NAME, ft_inputs([[9, 8, 7]], 3), client_timeout=60)
        done["short"] = time.monotonic()
        assert len(rows(r)[0]) == 6
        while True:
            result, err = q.get(timeout=120)
            assert err is None, err
            if result.get_response().parameters["triton_final_response"].bool_param:
                done["long"] = time.monotonic()
                assert result.as_numpy("sequence_length")[0, 0] == 122
                break
        client.stop_stream()
        assert done["short"] < done["long"]
    finally:
        restore()


def test_cancel_and_timeout_free_the_slot(served):
    srv, client, llm = served
    sched = srv.models[NAME].scheduler
    restore = _slow(llm, 0.02)
    try:
        # streaming client goes away mid-generation
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        q = queue.Queue()
        c.start_stream(callback=lambda result, error: q.put((result, error)))
        c.async_stream_infer(NAME, ft_inputs([[3, 4]], 100, min_length=(100, "UINT32")))
        assert q.get(timeout=60)[1] is None
        assert sched.live_slots == 1
        c.stop_stream(cancel_requests=True)
        c.close()
        deadline = time.monotonic() + 10
        while sched.live_slots and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.live_slots == 0                      # freed long before 100 steps x 20 ms
        # a sync request past its gRPC deadline is cancelled and frees its slot
        with pytest.raises(InferenceServerException) as e:
            client.infer(NAME, ft_inputs([[5]], 100, min_length=(100, "UINT32")), client_timeout=0.5)
        assert "Deadline" in str(e.value) or "DEADLINE" in str(e.value)
        deadline = time.monotonic() + 10
        while sched.live_slots and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.live_slots == 0
        # Triton's per-request timeout parameter (microseconds): refused with DEADLINE_EXCEEDED
        with pytest.raises(InferenceServerException) as e:
            client.infer(NAME, ft_inputs([[5]], 100, min_length=(100, "UINT32")), timeout=300_000, client_timeout=30)
        assert "timed out" in str(e.value)
    finally:
        restore()
    r = client.infer(NAME, ft_inputs([[5, 6]], 4))
    assert rows(r)[0][:2] == [5, 6] and len(rows(r)[0]) == 6


def test_bad_inputs_refused_and_server_keeps_serving(served):
    srv, client, llm = served
    V = llm.cfg.vocab
    good = ft_inputs([[1, 2, 3]], 4)
    ids, lens, out = good
    cases = [
        ([lens, out], "input_ids"),
        ([ids, out], "input_lengths"),
        ([ids, lens], "request_output_len"),
        ([_t("input_ids", np.array([[1.0, 2.0, 3.0]], np.float32), "FP32"), lens, out], "input_ids"),
        ([_t("input_ids", np.array([1, 2, 3], np.uint32), "UINT32"), lens, out], "input_ids"),
        ([ids, _t("input_lengths", np.array([[3], [3]], np.uint32), "UINT32"), out], "input_lengths"),
        ([ids, _t("input_lengths", np.array([[9]], np.uint32), "UINT32"), out], "input_lengths"),
        ([_t("input_ids", np.array([[1, V + 5, 3]], np.uint32), "UINT32"), lens, out], "input_ids"),
        ([ids, lens, _t("request_output_len", np.array([[SEQ]], np.uint32), "UINT32")], "request_output_len"),
        (ft_inputs([[1, 2, 3]], 4, runtime_top_p=(2.0, "FP32")), "runtime_top_p"),
        (ft_inputs([[1, 2, 3]], 4, temperature=(-1.0, "FP32")), "temperature"),
        (ft_inputs([[1, 2, 3]], 4, repetition_penalty=(0.0, "FP32")), "repetition_penalty"),
        (ft_inputs([[1, 2, 3]], 4, end_id=(V + 1, "UINT32")), "end_id"),
        (ft_inputs([[1, 2, 3]], 4, beam_width=(64, "UINT32")), "beam_width"),
        (ft_inputs([[1, 2, 3]], 4, stop_words_list=([[[1, 2], [1, 5]]], "INT32")), "stop_words_list"),
        (good + [_t("bogus", np.array([[1]], np.uint32), "UINT32")], "bogus"),
        # a legal UINT32 past int32: refused by name, not an engine failure (it stopped the server once)
        (ft_inputs([[1, 2, 3]], 4, min_length=(2**32 - 1, "UINT32")), "min_length"),
        (ft_inputs([[1, 2, 3]], 4, runtime_top_k=(2**31, "UINT32")), "runtime_top_k"),
        # FT inputs ftjax accepts only when neutral
        (ft_inputs([[1, 2, 3]], 4, is_return_context_embeddings=(True, "BOOL")), "is_return_context_embeddings"),
        (ft_inputs([[1, 2, 3]], 4, request_prompt_type=(1, "UINT32")), "request_prompt_type"),
    ]
    outs = [(["no_such_output"], "no_such_output"), (["output_ids", "cum_log_probs"], "cum_log_probs")]
    for want, name in outs:   # requested outputs the model has not, or did not compute
        with pytest.raises(InferenceServerException) as e:
            client.infer(NAME, good, outputs=[grpcclient.InferRequestedOutput(o) for o in want])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and name in e.value.message(), str(e.value)
    neutral = ft_inputs([[1, 2, 3]], 4, is_return_context_embeddings=(False, "BOOL"),
                        request_prompt_type=(0, "UINT32"), prompt_learning_task_name_ids=(3, "UINT32"))
    assert rows(client.infer(NAME, neutral)) == [[1, 2, 3] + llm.generate([[1, 2, 3]], 4).tokens[0]]
    for ins, name in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer(NAME, ins, client_timeout=30)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", (name, str(e.value))
        assert name in e.value.message(), (name, e.value.message())
    with pytest.raises(InferenceServerException) as e:
        client.infer("no_such_model", good)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    # the queue is bounded: full -> RESOURCE_EXHAUSTED
    sched = srv.models[NAME].scheduler
    sched.max_queue, keep = 0, sched.max_queue
    try:
        with sched._cv:   # every slot taken, no request may wait
            free, sched._free = sched._free, []
        try:
            with pytest.raises(InferenceServerException) as e:
                client.infer(NAME, good)
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        finally:
            with sched._cv:
                sched._free = free + sched._free
        # with free slots, max_queue 0 still takes a request each slot can hold at once
        assert rows(client.infer(NAME, good)) == [[1, 2, 3] + llm.generate([[1, 2, 3]], 4).tokens[0]]
    finally:
        sched.max_queue = keep
    # a bad request on a stream is answered with an error; the stream and the server go on
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    client.async_stream_infer(NAME, [ids, lens])
    assert "request_output_len" in str(q.get(timeout=30)[1])
    client.async_stream_infer(NAME, good)
    while True:
        result, err = q.get(timeout=60)
        assert err is None
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    r = client.infer(NAME, good)
    assert rows(r) == [[1, 2, 3] + llm.generate([[1, 2, 3]], 4).tokens[0]]


def test_stream_errors_name_their_request_and_versions_are_checked(served):
    """On a stream, a refused request's error response carries its id (Triton's), and an unknown model version
    is refused as on ModelInfer."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    srv, _, llm = served

    def req(rid, version="", out_len=3):
        r = pb.ModelInferRequest(model_name=NAME, model_version=version, id=rid)
        for name, vals, shape in (("input_ids", [1, 2, 3], [1, 3]), ("input_lengths", [3], [1, 1]),
                                  ("request_output_len", [out_len], [1, 1])):
            t = r.inputs.add(name=name, datatype="UINT32", shape=shape)
            t.contents.uint_contents.extend(vals)
        return r

    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        got = list(stub.ModelStreamInfer(iter([req("v7", version="7"), req("bad", out_len=SEQ), req("ok")]),
                                         timeout=120))
    errors = {g.infer_response.id: g.error_message for g in got if g.error_message}
    assert set(errors) == {"v7", "bad"}, errors
    assert "version" in errors["v7"] and "request_output_len" in errors["bad"]
    final = [g.infer_response for g in got if not g.error_message
             and g.infer_response.parameters["triton_final_response"].bool_param]
    assert [f.id for f in final] == ["ok"]


def test_protocol_endpoints_and_metrics(served):
    srv, client, llm = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert not client.is_model_ready("nope")
    md = client.get_model_metadata(NAME)
    assert {i.name for i in md.inputs} >= {"input_ids", "input_lengths", "request_output_len", "runtime_top_k"}
    # the shapes the server reads, batch dimension first (what a client building requests from metadata sends)
    shapes = {i.name: list(i.shape) for i in md.inputs}
    assert shapes["input_ids"] == [-1, -1] and shapes["input_lengths"] == [-1, 1]
    assert [list(o.shape) for o in md.outputs if o.name == "output_ids"] == [[-1, -1, -1]]
    cfg = client.get_model_config(NAME).config
    assert cfg.max_batch_size == 1024
    assert cfg.name == NAME and cfg.model_transaction_policy.decoupled
    assert [m.name for m in client.get_model_repository_index().models] == [NAME]
    assert client.get_server_metadata().name == "ftjax"
    client.infer(NAME, ft_inputs([[1, 2]], 2))
    st = client.get_inference_statistics(NAME).model_stats[0]
    assert st.inference_stats.success.count >= 1
    with pytest.raises(InferenceServerException) as e:
        client.unload_model(NAME)
    assert "UNIMPLEMENTED" in e.value.status()
    # a request the engine fails (Triton's per-request timeout, 1 us, long before 100 tokens exist), so
    # that this test sees a failure counted whatever ran before it on this worker
    with pytest.raises(InferenceServerException):
        client.infer(NAME, ft_inputs([[1, 2]], 100), timeout=1)
    names = ("nv_inference_request_success", "nv_inference_request_failure", "ftjax_queue_seconds_count",
             "ftjax_time_to_first_token_seconds_bucket", "ftjax_generated_tokens_total", "ftjax_batch_occupancy")
    # the timed-out request is counted when the server notices the client gave up: asynchronously
    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        if all(f"{m}{{" in text for m in names) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for metric in names:
        assert f"{metric}{{" in text, metric
    tok = [ln for ln in text.splitlines() if ln.startswith("ftjax_generated_tokens_total{")]
    assert float(tok[0].split()[-1]) > 0


def test_decode_inputs_names_the_tensor_for_impossible_shapes():
    """Shapes and byte counts checked before any array is built: a shape whose element count overflows int64
    is reported with its true size, not a wrapped-around one."""
    from tritonclient.grpc import service_pb2 as pb

    from ftjax.serve.tensors import TensorError, decode_inputs

    r = pb.ModelInferRequest(model_name=NAME)
    r.inputs.add(name="input_ids", datatype="UINT32", shape=[2**32, 2**32])
    r.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(TensorError, match=r"input_ids: 8 bytes .* \(73786976294838206464 expected\)"):
        decode_inputs(r)
    r = pb.ModelInferRequest(model_name=NAME)
    t = r.inputs.add(name="input_lengths", datatype="UINT32", shape=[2, 1])
    t.contents.uint_contents.extend([3])
    with pytest.raises(TensorError, match="input_lengths: 1 values in contents for shape"):
        decode_inputs(r)


def test_max_beam_width_reaches_the_engine(tmp_path):
    """--max-beam-width (load_models' max_beam_width): beam requests up to it are taken, wider ones refused by
    name; it is capped by the slots."""
    from ftjax.serve.server import load_models
    from ftjax.serve.tensors import parse_gpt
    from ftjax.serve.server import make_params

    path = str(tmp_path / "m")
    make_hf_gpt2(path, n_positions=32)
    (m,) = load_models(model=path, dtype="float32", max_batch_size=8, max_seq_len=32, attention="xla",
                       max_beam_width=6)
    assert m.llm.engine.max_beam_width == 6

    def ask(w):
        ins = {"input_ids": np.array([[1, 2]], np.uint32), "input_lengths": np.array([[2]], np.uint32),
               "request_output_len": np.array([[3]], np.uint32), "beam_width": np.array([[w]], np.uint32)}
        return parse_gpt(ins, {k: "UINT32" for k in ins}, make_params=lambda kw: make_params(m.llm, kw),
                         check_prompt=m.llm.engine.check_prompt)
    assert ask(6)[0].params.beam_width == 6
    with pytest.raises(ValueError, match="beam_width"):
        ask(7)
    (m,) = load_models(model=path, dtype="float32", max_batch_size=2, max_seq_len=32, attention="xla",
                       max_beam_width=6)
    assert m.llm.engine.max_beam_width == 2


@pytest.mark.parametrize("frontends", [1, 2])
def test_stop_answers_requests_that_finish_within_the_grace(tmp_path, frontends):
    """Server.stop(grace) (SIGTERM): a request in flight that finishes within the grace period is answered,
    with the front ends too (they kept reading the engine's updates only until the stop message)."""
    from ftjax.serve.server import Server, load_models

    path = str(tmp_path / "m")
    make_hf_gpt2(path, n_positions=64)
    models = load_models(model=path, dtype="float32", max_batch_size=2, max_seq_len=64, attention="xla")
    llm = models[0].llm
    srv = Server(models, grpc_port=0, metrics_port=0, chunk=2, frontends=frontends).start()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    stopped = False
    try:
        client.infer(NAME, ft_inputs([[3, 4]], 4))   # compiled
        restore = _slow(llm, 0.05)
        out = {}

        def go():
            try:
                out["r"] = rows(client.infer(NAME, ft_inputs([[3, 4]], 12), client_timeout=60))
            except InferenceServerException as e:
                out["r"] = e

        th = threading.Thread(target=go)
        th.start()
        time.sleep(0.15)   # the request is live: ~6 calls of 2 steps, 50 ms each, still to go
        srv.stop(grace=5.0)
        stopped = True
        th.join(60)
        restore()
        assert out["r"] == [[3, 4] + llm.generate([[3, 4]], 12).tokens[0]], out["r"]
    finally:
        client.close()
        if not stopped:
            srv.stop()


def test_frontends_refuse_a_port_another_server_holds(tmp_path):
    """Front ends bind with SO_REUSEPORT; a server already listening there (itself with SO_REUSEPORT, as
    front ends are) is found before any is spawned, instead of the two sharing the port's connections."""
    import socket

    from ftjax.serve.server import Server, load_models

    path = str(tmp_path / "m")
    make_hf_gpt2(path, n_positions=32)
    models = load_models(model=path, dtype="float32", max_batch_size=1, max_seq_len=32, attention="xla")
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind gRPC to 127.0.0.1:{port}"):
            Server(models, grpc_port=port, metrics_port=0, frontends=2).start()
