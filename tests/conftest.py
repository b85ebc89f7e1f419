"""Shared fixtures. Tests run on 8 virtual CPU devices; the oracle is HF transformers on CPU torch."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA:CPU compiling tiny programs: without LLVM's optimisations (O0) they compile
# ~30% faster and run as fast as the tests need (test_engine + test_decoding, cold cache: 111 -> 80 s).
# FTJAX_TEST_XLA_OPT=default keeps XLA's level. Child processes of the tests inherit XLA_FLAGS when they extend it.
if (os.environ.get("FTJAX_TEST_XLA_OPT") != "default" and os.environ["JAX_PLATFORMS"] == "cpu"
        and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# jax's persistent compilation cache for the tests, in one directory that outlives the run
# (~/.cache/ftjax/test-xla; FTJAX_TEST_XLA_CACHE=DIR elsewhere, =off for none). Within one run few programs
# repeat, but most of the suite's time is XLA compiling on 2 cores: a run on the same machine after another
# reads the unchanged programs back (tests/test_engine.py + test_decoding.py: 157 s cold, 43 s warm). Keys are
# the programs and the jax version, so a change recompiles what it touches. The cache is kept under 2 GB by
# trimming the oldest entries once when a test process starts (`_trim_cache`), not by jax's own LRU
# (`jax_compilation_cache_max_size`): that one lists, stats and reads the access stamp of every entry under a
# file lock on each write, ~0.7 s a compile with 5,000 entries here, serialised across the xdist workers.
_XLA_CACHE = os.environ.get("FTJAX_TEST_XLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ftjax",
                                                                     "test-xla")
_XLA_CACHE_MAX = 2 * 2**30


def _trim_cache(path, max_bytes, keep_fraction=0.75):
    """Delete the oldest entries (by modification time) of a cache directory over max_bytes until it holds at
    most keep_fraction of it. Another process may be reading or trimming at the same time: a file that is gone
    is skipped."""
    entries = []
    for e in os.scandir(path):
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        if e.is_file():
            entries.append((st.st_mtime, st.st_size, e.path))
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return
    for _, size, p in sorted(entries):
        if total <= keep_fraction * max_bytes:
            break
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        total -= size


if _XLA_CACHE != "off":
    from ftjax import compile_cache  # noqa: E402

    compile_cache.enable(_XLA_CACHE)
    _trim_cache(_XLA_CACHE, _XLA_CACHE_MAX)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

VOCAB = 211


def make_hf_gpt2(path, *, seed=0, vocab=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=None,
                 activation="gelu_new", tie=True, n_positions=128, eos=None):
    """A tiny random HF GPT-2 saved with save_pretrained; returns the torch model (eval, float32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, n_inner=n_inner, activation_function=activation,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=eos if eos is not None else vocab - 1,
                                  pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Larger-than-default init so tiny models have confident, non-degenerate logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """(path, torch model): tied head, tanh GELU, non-4x FFN."""
    path = str(tmp_path_factory.mktemp("gpt2_tied"))
    return path, make_hf_gpt2(path, n_inner=72)


@pytest.fixture(scope="session")
def gpt2_untied_dir(tmp_path_factory):
    """(path, torch model): untied head, exact GELU."""
    path = str(tmp_path_factory.mktemp("gpt2_untied"))
    return path, make_hf_gpt2(path, seed=1, activation="gelu", tie=False, n_layer=3)


def random_prompts(rng, n, lo, hi, vocab=VOCAB):
    return [rng.randint(1, vocab - 1, size=rng.randint(lo, hi + 1)).tolist() for _ in range(n)]


def hf_greedy(model, prompt, max_new, eos=None):
    """HF greedy continuation of one prompt: (generated ids, per-step raw logits [steps, vocab])."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             num_beams=1)
    toks = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack(out.logits, 1)[0].float().numpy()
    return toks, logits


def assert_greedy_match(ours, ref, ref_logits, tie_tol=1e-3):
    """Token-identical, except that at a near-tie in the reference (top two logits within tie_tol)
    either token is accepted and the rest of the row is not compared."""
    for j, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = np.sort(ref_logits[j])[-2:]
            assert top2[1] - top2[0] < tie_tol, f"step {j}: ours {a} vs reference {b} (not a near-tie); ours={ours} ref={ref}"
            return
    assert len(ours) == len(ref), f"lengths differ: ours={ours} ref={ref}"


def infer_input(name, arr, datatype):
    """A tritonclient InferInput carrying `arr`."""
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


def wait_server_ready(client, procs, timeout: float):
    """Polls a tritonclient until its server is ready; fails at once, with its output, when one of the
    server processes `procs` (subprocess.Popen, stdout piped) has exited."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, p.stdout.read()[-3000:]
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.25)
