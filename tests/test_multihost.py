"""Two jax.distributed processes on 127.0.0.1 (2 virtual CPU devices each, T=2 x P=2) decode the same
tokens as one process; when one process dies the other fails fast with an error instead of hanging."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ftjax
from tests.conftest import make_hf_gpt2, random_prompts, wait_server_ready

PROMPTS = random_prompts(np.random.RandomState(2), 4, 1, 12)

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    port, pid, ckpt, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from ftjax.sharding import distributed
    distributed.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_s=5, init_timeout_s=60)
    import jax
    import ftjax
    llm = ftjax.load(ckpt, dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32,
                     tensor_parallel=2, pipeline_parallel=2, max_beam_width=1)
    p = llm.engine.params["stages"][0]["attn"]["q"]["kernel"]
    local = sorted({tuple((s.start or 0, s.stop) for s in sh.index[:1]) for sh in p.addressable_shards})
    print("LOCAL", json.dumps(local), flush=True)
    if mode == "die" and pid == 1:
        os._exit(3)
    prompts = json.loads(sys.argv[5])
    res = llm.generate(prompts, max_new_tokens=8, end_id=None)
    if mode == "die":
        res = llm.generate(prompts, max_new_tokens=8, end_id=None)
    print("TOKENS", json.dumps(res.tokens), flush=True)
    if mode == "ok":   # more prompts than slots: the continuous path, every process in step
        more = llm.generate(prompts + prompts[:2], max_new_tokens=[8, 3, 5, 8, 2, 6], end_id=None)
        print("CONT", json.dumps(more.tokens), flush=True)
""")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An ftjax (orbax) checkpoint: each process restores only its own shards."""
    from ftjax.checkpoint import load_checkpoint, orbax_io

    src = str(tmp_path_factory.mktemp("mh_hf"))
    make_hf_gpt2(src, vocab=212, n_head=4, n_layer=4, seed=7)
    cfg, params = load_checkpoint(src)
    dst = str(tmp_path_factory.mktemp("mh_ftjax"))
    orbax_io.save(dst, cfg, params, dtype="float32")
    return dst


def _launch(ckpt, mode):
    port = _port()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), ckpt, mode, json.dumps(PROMPTS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(2)]


def _line(out, tag):
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith(tag + " "))[len(tag) + 1:])


def test_two_processes_decode_like_one(ckpt):
    procs = _launch(ckpt, "ok")
    ref = ftjax.load(ckpt, dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32, max_beam_width=1)
    want = ref.generate(PROMPTS, max_new_tokens=8, end_id=None).tokens
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    for out in outs:
        assert _line(out, "TOKENS") == want
        # greedy with no end id: a shorter max_new_tokens gives a prefix of the same continuation
        assert _line(out, "CONT") == [w[:m] for w, m in zip(want + want[:2], [8, 3, 5, 8, 2, 6])]
    # each process holds (and restored) only its own pipeline stage of the stacked weights
    assert _line(outs[0], "LOCAL") == [[[0, 1]]] and _line(outs[1], "LOCAL") == [[[1, 2]]]


def test_peer_death_fails_fast(ckpt):
    procs = _launch(ckpt, "die")
    t0 = time.monotonic()
    out, err = procs[0].communicate(timeout=150)
    elapsed = time.monotonic() - t0
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0, out
    assert "TOKENS" not in out
    assert elapsed < 60, elapsed   # heartbeat timeout 5 s: seconds, not jax's default 100 s, nor a hang
    assert "another task died" in err or "stopped sending heartbeats" in err, err[-2000:]


def test_two_process_server_answers_a_client(ckpt):
    """`python -m ftjax.serve` on two processes: process 0 serves gRPC, process 1 follows its engine calls (the
    slots released after each request, `Engine.release_slots`, included)."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    coord, gp, mp = _port(), _port(), _port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               FTJAX_HEARTBEAT_TIMEOUT_S="10")
    procs = [subprocess.Popen([sys.executable, "-m", "ftjax.serve", "--model", ckpt, "--dtype", "float32",
                               "--tensor-parallel", "2", "--pipeline-parallel", "2", "--max-batch-size", "4",
                               "--max-seq-len", "32", "--grpc-port", str(gp + i), "--metrics-port", str(mp + i),
                               "--warmup", "none",   # (its calls are the published ones; kept out for time)
                               "--coordinator-address", f"127.0.0.1:{coord}", "--num-processes", "2",
                               "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env, text=True) for i in range(2)]
    try:
        ref = ftjax.load(ckpt, dtype="float32", attention="xla", max_batch_size=4, max_seq_len=32)
        want = ref.generate(PROMPTS[:2], max_new_tokens=6, end_id=None).tokens
        with grpcclient.InferenceServerClient(f"127.0.0.1:{gp}") as c:
            wait_server_ready(c, procs, 180)
            for prompt, toks in zip(PROMPTS[:2], want):
                ins = []
                for name, arr in (("input_ids", np.array([prompt], np.uint32)),
                                  ("input_lengths", np.array([[len(prompt)]], np.uint32)),
                                  ("request_output_len", np.array([[6]], np.uint32))):
                    t = grpcclient.InferInput(name, list(arr.shape), "UINT32")
                    t.set_data_from_numpy(arr)
                    ins.append(t)
                r = c.infer("fastertransformer", ins)
                n = int(r.as_numpy("sequence_length")[0, 0])
                assert r.as_numpy("output_ids")[0, 0, :n].tolist() == prompt + toks
    finally:
        procs[0].terminate()     # process 0 tells process 1 to stop
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    assert procs[1].returncode == 0, procs[1].stdout.read()[-3000:]
