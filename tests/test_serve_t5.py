"""T5 through the gRPC server with FasterTransformer's T5 tensor names (real tritonclient.grpc)."""
import queue

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import infer_input as _t  # noqa: E402
from tests.test_t5 import make_hf_t5  # noqa: E402

NAME = "fastertransformer"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ftjax.serve.server import Server, load_models

    path = str(tmp_path_factory.mktemp("serve_t5"))
    make_hf_t5(path, proj="gated-gelu", scale=False, seed=3)
    models = load_models(model=path, dtype="float32", max_batch_size=8, max_seq_len=32, attention="xla")
    srv = Server(models, grpc_port=0, metrics_port=0, chunk=4).start()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    yield srv, client, models[0].llm, path
    client.close()
    srv.stop()


def t5_inputs(prompts, out_len, **extra):
    b, L = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, L), np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    ins = [_t("input_ids", ids, "UINT32"),
           _t("sequence_length", np.array([[len(p)] for p in prompts], np.uint32), "UINT32"),
           _t("max_output_len", np.full((b, 1), out_len, np.uint32), "UINT32")]
    for name, (val, dt, npt) in extra.items():
        ins.append(_t(name, np.full((b, 1), val, npt), dt))
    return ins


def test_t5_sync_beam_and_stream(served):
    srv, client, llm, _ = served
    prompts = [[5, 6, 7, 8, 9], [11, 12], [100, 3, 4, 50, 60, 70, 80]]
    r = client.infer(NAME, t5_inputs(prompts, 9, is_return_log_probs=(True, "BOOL", np.bool_)))
    ref = llm.generate(prompts, max_new_tokens=9, return_log_probs=True)
    ids, lens = r.as_numpy("output_ids"), r.as_numpy("sequence_length")
    assert ids.dtype == np.int32 and lens.dtype == np.int32
    assert [ids[i, 0, : lens[i, 0]].tolist() for i in range(3)] == ref.tokens   # decoder tokens only
    np.testing.assert_allclose(r.as_numpy("cum_log_probs")[:, 0], ref.cum_log_probs, atol=1e-4)
    # beam search: every beam, best first
    r = client.infer(NAME, t5_inputs(prompts[:2], 7, beam_width=(3, "UINT32", np.uint32)))
    ref = llm.generate(prompts[:2], max_new_tokens=7, beam_width=3)
    ids, lens = r.as_numpy("output_ids"), r.as_numpy("sequence_length")
    assert ids.shape[1] == 3
    for i in range(2):
        assert [ids[i, k, : lens[i, k]].tolist() for k in range(3)] == ref.beams[i]
    # streaming: one response per token, then the final flag
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(NAME, t5_inputs(prompts[1:2], 6), request_id="s")
        got = []
        while True:
            result, error = q.get(timeout=60)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if final:
                break
            got.append(result.as_numpy("output_ids")[0, 0, : result.as_numpy("sequence_length")[0, 0]].tolist())
    finally:
        client.stop_stream()
    want = llm.generate(prompts[1:2], max_new_tokens=6).tokens[0]
    assert got == [want[:k] for k in range(1, len(want) + 1)]


def test_t5_bad_inputs_and_metadata(served):
    srv, client, llm, _ = served
    good = t5_inputs([[5, 6, 7]], 4)
    with pytest.raises(InferenceServerException, match="input_lengths: unknown input tensor"):
        client.infer(NAME, good + [_t("input_lengths", np.array([[3]], np.uint32), "UINT32")])
    with pytest.raises(InferenceServerException, match="max_output_len: required"):
        client.infer(NAME, good[:2])
    with pytest.raises(InferenceServerException, match="sequence_length: row 0"):
        client.infer(NAME, [good[0], _t("sequence_length", np.array([[9]], np.uint32), "UINT32"), good[2]])
    with pytest.raises(InferenceServerException, match="max_output_len"):
        client.infer(NAME, t5_inputs([[5, 6]], 40))
    meta = client.get_model_metadata(NAME)
    assert {t.name for t in meta.inputs} >= {"input_ids", "sequence_length", "max_output_len"}
    assert {t.name: t.datatype for t in meta.outputs}["output_ids"] == "INT32"
    assert client.infer(NAME, good).as_numpy("output_ids").shape[0] == 1


def test_t5_repository_config(served, tmp_path):
    from ftjax.serve.server import load_models

    _, _, _, path = served
    repo = tmp_path / "repo" / "t5model"
    repo.mkdir(parents=True)
    text = open("serve/model_repository/t5/fastertransformer/config.pbtxt").read()
    text = text.replace('name: "fastertransformer"', 'name: "t5model"')
    import re
    text = re.sub(r'(key: "model_checkpoint_path"\s*value: \{\s*string_value: )"[^"]*"', rf'\1"{path}"', text)
    text = re.sub(r'(key: "data_type"\s*value: \{\s*string_value: )"[^"]*"', r'\1"fp32"', text)
    (repo / "config.pbtxt").write_text(text)
    models = load_models(model_repository=str(tmp_path / "repo"), max_batch_size=4, max_seq_len=32, attention="xla")
    assert models[0].name == "t5model" and models[0].llm.cfg.arch == "t5"
    gtext = open("serve/model_repository/gpt/fastertransformer/config.pbtxt").read()
    gtext = re.sub(r'(key: "model_checkpoint_path"\s*value: \{\s*string_value: )"[^"]*"', rf'\1"{path}"', gtext)
    (repo / "config.pbtxt").write_text(gtext.replace('name: "fastertransformer"', 'name: "t5model"'))
    with pytest.raises(ValueError, match="model_type GPT"):
        load_models(model_repository=str(tmp_path / "repo"), max_batch_size=4, max_seq_len=32, attention="xla")


def test_t5_through_the_sample_client(served):
    """serve/client.py sends T5's tensors (sequence_length, max_output_len) from a request file, unary and
    streamed; the answer is the library's."""
    import json
    import os
    import subprocess
    import sys

    srv, _, llm, _ = served
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "serve", "client.py"),
           os.path.join(root, "serve", "requests", "sample_request_t5.json"), "--url", f"127.0.0.1:{srv.grpc_port}",
           "--json", "--params", "max_output_len=5", "--params", "input_ids=[[37, 42, 10, 5, 12, 1]]"]
    want = llm.generate([[37, 42, 10, 5, 12, 1]], max_new_tokens=5).tokens[0]
    for extra in ([], ["--stream"]):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        last = json.loads(r.stdout.strip().splitlines()[-1])
        assert last["output_ids"] == [[want]]
