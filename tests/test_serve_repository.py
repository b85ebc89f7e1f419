"""Model repository (FT's config.pbtxt -> an FT-converted folder), its refusals, and the CLI end to end:
`python -m ftjax.serve` in a subprocess on free ports, driven by `serve/client.py` with a sample file."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")

from conftest import wait_server_ready  # noqa: E402
from test_checkpoint_formats import _hf_model, write_ft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT_CONFIG = os.path.join(ROOT, "serve", "model_repository", "gpt", "fastertransformer", "config.pbtxt")
T5_CONFIG = os.path.join(ROOT, "serve", "model_repository", "t5", "fastertransformer", "config.pbtxt")


def _set_param(text, key, value):
    pat = re.compile(r'(key: "%s"\s*value: \{\s*string_value: ")[^"]*(")' % re.escape(key))
    assert pat.search(text), key
    return pat.sub(lambda m: m.group(1) + value + m.group(2), text)


@pytest.fixture(scope="module")
def ft_folder(tmp_path_factory):
    """(FT-converted folder, torch model): tensor_para_size 1, fp32 weights."""
    tmp = tmp_path_factory.mktemp("ft_repo")
    model = _hf_model(str(tmp / "hf"), activation="gelu_new")
    return write_ft(str(tmp / "ft"), model, T=1), model


def _repo(tmp_path, ckpt, **params):
    d = tmp_path / "repo" / "gpt_ft"
    d.mkdir(parents=True)
    text = open(GPT_CONFIG).read().replace('name: "fastertransformer"', 'name: "gpt_ft"')
    text = _set_param(text, "model_checkpoint_path", ckpt)
    text = _set_param(text, "data_type", "fp32")
    for k, v in params.items():
        text = _set_param(text, k, v)
    (d / "config.pbtxt").write_text(text)
    return str(tmp_path / "repo")


def test_repository_serves_ft_folder(tmp_path, ft_folder):
    import torch

    from ftjax.serve.server import Server, load_models

    ckpt, model = ft_folder
    models = load_models(model_repository=_repo(tmp_path, ckpt), max_batch_size=4, attention="xla")
    assert [m.name for m in models] == ["gpt_ft"] and models[0].llm.engine.dtype.__name__ == "float32"
    srv = Server(models, grpc_port=0, metrics_port=None).start()
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}") as c:
            prompt = [5, 17, 33, 2]
            ins = []
            for name, arr in [("input_ids", np.array([prompt], np.uint32)), ("input_lengths", np.array([[4]], np.uint32)),
                              ("request_output_len", np.array([[8]], np.uint32)),
                              ("end_id", np.array([[0]], np.uint32)), ("min_length", np.array([[8]], np.uint32))]:
                t = grpcclient.InferInput(name, list(arr.shape), "UINT32")
                t.set_data_from_numpy(arr)
                ins.append(t)
            r = c.infer("gpt_ft", ins)
            cfg = c.get_model_config("gpt_ft").config
            assert cfg.parameters["model_type"].string_value == "GPT"
            assert len(cfg.input) == 21
    finally:
        srv.stop()
    with torch.no_grad():   # HF greedy oracle (end_id 0 suppressed by min_length -> 8 tokens)
        ids = torch.tensor([prompt])
        for _ in range(8):
            logits = model(ids).logits[0, -1]
            logits[0] = -float("inf")
            ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
    assert r.as_numpy("output_ids")[0, 0].tolist() == ids[0].tolist()


@pytest.mark.parametrize("param,value,msg", [
    ("int8_mode", "2", "int8_mode"),
    ("tensor_para_size", "3", "tensor_parallel=3"),        # does not divide the heads
    ("pipeline_para_size", "3", "pipeline_parallel=3"),    # does not divide the layers
    ("model_type", "T5", "T5"),
    ("data_type", "fp8", "data_type"),
    ("model_checkpoint_path", "/no/such/dir", "model_checkpoint_path"),
])
def test_repository_refusals(tmp_path, ft_folder, param, value, msg):
    from ftjax.serve.server import load_models

    kw = {param: value}
    ckpt = kw.pop("model_checkpoint_path", ft_folder[0])
    with pytest.raises(ValueError, match=msg):
        load_models(model_repository=_repo(tmp_path, ckpt, **kw), max_batch_size=2, attention="xla")


def test_repository_int8_mode_1_quantizes(tmp_path, ft_folder):
    """FT's int8_mode 1 is weight-only INT8: the model's projections are int8 once loaded, and its greedy
    tokens are those of the same checkpoint loaded with quantize="int8"."""
    import ftjax
    from ftjax.layers.linear import QuantizedWeight, QuantizedWeightT
    from ftjax.serve.server import load_models

    ckpt, _ = ft_folder
    (m,) = load_models(model_repository=_repo(tmp_path, ckpt, int8_mode="1"), max_batch_size=2, attention="xla")
    k = m.llm.engine.params["layers_0"]["mlp"]["wi"]["kernel"]
    assert isinstance(k, (QuantizedWeight, QuantizedWeightT))
    ref = ftjax.load(ckpt, dtype="float32", max_batch_size=2, attention="xla", quantize="int8")
    prompts = [[5, 17, 33, 2], [9, 1, 4]]
    assert m.llm.generate(prompts, max_new_tokens=6, end_id=None).tokens == \
        ref.generate(prompts, max_new_tokens=6, end_id=None).tokens


def test_shipped_configs_parse(tmp_path):
    from ftjax.serve import repository

    cfg = repository.parse_config(GPT_CONFIG)
    assert cfg.name == "fastertransformer" and cfg.model_transaction_policy.decoupled
    names = {i.name: i for i in cfg.input}
    from ftjax.serve import tensors

    assert set(tensors.GPT_INPUTS) <= set(names)
    assert not names["input_ids"].optional and names["runtime_top_k"].optional
    t5 = repository.parse_config(T5_CONFIG)
    assert set(tensors.T5_REQUIRED) <= {i.name for i in t5.input}
    # the shipped T5 config parses; its checkpoint folder is not shipped, so loading names the path
    with pytest.raises(repository.RepositoryError, match="model_checkpoint_path"):
        repository.spec_from_config(t5, str(tmp_path), "t5", T5_CONFIG)
    with pytest.raises(repository.RepositoryError, match="no <name>/config.pbtxt"):
        repository.load_repository(str(tmp_path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_server_and_client(tmp_path, ft_folder):
    ckpt, _ = ft_folder
    gp, mp = _free_port(), _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "ftjax.serve", "--model", ckpt, "--dtype", "float32",
                             "--max-batch-size", "2", "--grpc-port", str(gp), "--metrics-port", str(mp),
                             "--request-timeout", "60", "--compile-cache", str(tmp_path / "xla_cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{gp}") as c:
            wait_server_ready(c, [proc], 120)
        req = tmp_path / "req.json"
        req.write_text(json.dumps({"request": [
            {"name": "input_ids", "data": [[5, 17, 33, 2]], "dtype": "uint32"},
            {"name": "input_lengths", "data": [[4]], "dtype": "uint32"},
            {"name": "request_output_len", "data": [[6]], "dtype": "uint32"}]}))
        client = [sys.executable, os.path.join(ROOT, "serve", "client.py"), str(req), "--url", f"127.0.0.1:{gp}", "--json"]
        sync = subprocess.run(client + ["--params", "min_length=6", "--params", "end_id=0"], capture_output=True,
                              text=True, timeout=120)
        assert sync.returncode == 0, sync.stderr
        out = json.loads(sync.stdout.strip().splitlines()[-1])
        assert out["sequence_length"] == [[10]] and out["output_ids"][0][0][:4] == [5, 17, 33, 2]
        stream = subprocess.run(client + ["--stream", "--params", "min_length=6", "--params", "end_id=0"],
                                capture_output=True, text=True, timeout=120)
        assert stream.returncode == 0, stream.stderr
        lines = [json.loads(x) for x in stream.stdout.strip().splitlines()]
        assert [x["sequence_length"][0][0] for x in lines] == [5, 6, 7, 8, 9, 10, 10]
        assert lines[-1]["final"] and lines[-1]["output_ids"] == out["output_ids"]
        bad = subprocess.run(client + ["--params", "runtime_top_p=3"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "runtime_top_p" in bad.stderr
        for f in ("sample_request_single.json", "sample_request_batch.json", "sample_request_sampling.json"):
            r = subprocess.run([sys.executable, os.path.join(ROOT, "serve", "client.py"),
                                os.path.join(ROOT, "serve", "requests", f), "--url", f"127.0.0.1:{gp}", "--json",
                                "--params", "request_output_len=4"], capture_output=True, text=True, timeout=120)
            # the tiny model's vocabulary (96) is smaller than the sample ids: refused by name, server fine
            assert r.returncode in (0, 1), r.stderr
            assert r.returncode == 0 or "input_ids" in r.stderr or "words" in r.stderr, r.stderr
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{mp}/metrics", timeout=10).read().decode()
        assert 'nv_inference_request_success{model="fastertransformer",version="1"}' in text
        from ftjax import compile_cache

        # the compiled steps went to the persistent cache: a restarted server reads them back
        assert compile_cache.entries(str(tmp_path / "xla_cache")) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_cli_refusals():
    r = subprocess.run([sys.executable, "-m", "ftjax.serve", "--num-processes", "2", "--process-id", "2",
                        "--coordinator-address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "multi-host" in r.stderr and "process_id=2" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ftjax.serve", "--model-repository", "/no/such/repo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_repository_config_errors_name_the_file(tmp_path, ft_folder):
    """max_batch_size 0 (Triton: dims without a batch dimension, which FT's tensors always have) and a config
    that is not UTF-8 are refused naming the file; a taken metrics port names the port."""
    import socket

    from ftjax.serve.metrics import Metrics, MetricsServer
    from ftjax.serve.server import load_models

    repo = _repo(tmp_path / "a", ft_folder[0])
    cfg = os.path.join(repo, "gpt_ft", "config.pbtxt")
    text = open(cfg).read()
    open(cfg, "w").write(text.replace("max_batch_size: 1024", "max_batch_size: 0"))
    with pytest.raises(ValueError, match="max_batch_size 0"):
        load_models(model_repository=repo, max_batch_size=2, attention="xla")
    open(cfg, "wb").write(b"# caf\xe9\n" + text.encode())
    with pytest.raises(ValueError, match="config.pbtxt: not UTF-8"):
        load_models(model_repository=repo, max_batch_size=2, attention="xla")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics server: cannot bind 127.0.0.1:{port}"):
            MetricsServer(Metrics(), "127.0.0.1", port)
