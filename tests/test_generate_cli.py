"""`python -m ftjax.generate`: a file of prompts larger than max_batch_size, results in order, equal to
the library's; the embedded default model runs with nothing downloaded; bad files are refused."""
import json
import os
import subprocess
import sys

import numpy as np

import ftjax
from ftjax.checkpoint.hf import load_gpt2
from tests.conftest import random_prompts

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ftjax.generate", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_cli_file_matches_library(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    prompts = random_prompts(np.random.RandomState(9), 7, 1, 12)
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps(p if i % 2 else {"input_ids": p}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run("--model", path, "--input", str(inp), "--output", str(out), "--dtype", "float32",
             "--max-batch-size", "3", "--max-new-tokens", "6", "--attention", "xla", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert "7/7 prompts" in r.stderr and "tokens/s" in r.stderr
    recs = [json.loads(line) for line in open(out)]
    assert [r["index"] for r in recs] == list(range(7))
    cfg, params = load_gpt2(path)
    lib = ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=3, max_seq_len=64)
    want = lib.generate(prompts, max_new_tokens=6)
    assert [r["output_ids"] for r in recs] == want.tokens
    assert [r["input_ids"] for r in recs] == prompts


def test_cli_default_model_and_bad_input(tmp_path):
    r = _run("--max-new-tokens", "3", "--dtype", "float32", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert "embedded default model" in r.stderr
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\nnot json\n')
    r = _run("--input", str(bad), "--max-new-tokens", "2", "--max-seq-len", "64")
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(list(range(1, 70))) + "\n")
    r = _run("--input", str(big), "--max-new-tokens", "2", "--max-seq-len", "64")
    assert r.returncode == 2 and "max_seq_len" in r.stderr


def test_cli_text_prompts_with_tokenizer_json(gpt2_dir, tmp_path):
    """A model folder with a tokenizer.json: text prompts are encoded, and outputs carry text."""
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    src, _ = gpt2_dir
    model = tmp_path / "model"
    shutil.copytree(src, model)
    vocab = {f"w{i}": i for i in range(200)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(model / "tokenizer.json"))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "w5 w17 w42"}) + "\n" + json.dumps({"input_ids": [5, 17, 42]}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run("--model", str(model), "--input", str(inp), "--output", str(out), "--dtype", "float32",
             "--max-new-tokens", "4", "--attention", "xla", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    a, b = [json.loads(line) for line in open(out)]
    assert a["input_ids"] == [5, 17, 42] and a["output_ids"] == b["output_ids"]
    assert a["text"].split() == [f"w{t}" for t in a["output_ids"]]


def test_cli_decoding_flags_and_per_line_settings(gpt2_dir, tmp_path):
    """Flags set every line's decoding; a line's own keys override them; continuous decoding over 3 slots gives
    each line what the library gives it alone."""
    path, _ = gpt2_dir
    prompts = random_prompts(np.random.RandomState(4), 6, 2, 10)
    own = [{}, {"top_k": 0, "max_new_tokens": 2}, {"random_seed": 9}, {"beam_width": 2},
           {"stop_words": [[prompts[4][0]]], "max_new_tokens": 7}, {"temperature": 0.5, "return_log_probs": True}]
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for p, o in zip(prompts, own):
            f.write(json.dumps({"input_ids": p, **o}) + "\n\n")   # blank lines are skipped
    out = tmp_path / "out.jsonl"
    r = _run("--model", path, "--input", str(inp), "--output", str(out), "--dtype", "float32",
             "--max-batch-size", "3", "--max-new-tokens", "5", "--attention", "xla", "--max-seq-len", "64",
             "--top-k", "4", "--random-seed", "3", "--repetition-penalty", "1.2", "--end-id", "none")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in open(out)]
    cfg, params = load_gpt2(path)
    lib = ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=3, max_seq_len=64)
    for p, o, rec in zip(prompts, own, recs):
        kw = {"top_k": 4, "random_seed": 3, "repetition_penalty": 1.2, "end_id": None,
              **{k: v for k, v in o.items() if k != "max_new_tokens"}}
        want = lib.generate([p], max_new_tokens=o.get("max_new_tokens", 5), **kw)
        assert rec["output_ids"] == want.tokens[0], (o, rec)
        assert ("beams" in rec) == ("beam_width" in o) and ("output_log_probs" in rec) == ("return_log_probs" in o)
    assert len(recs[1]["output_ids"]) == 2 and len(recs[0]["output_ids"]) == 5


def test_cli_refuses_bad_settings_naming_the_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('[1, 2]\n\n{"input_ids": [3], "top_k": -1}\n')
    r = _run("--input", str(inp), "--max-new-tokens", "2", "--max-seq-len", "64")
    assert r.returncode != 0 and "in.jsonl:3" in r.stderr and "top_k" in r.stderr
    inp.write_text('{"input_ids": [3], "topk": 2}\n')
    r = _run("--input", str(inp), "--max-new-tokens", "2", "--max-seq-len", "64")
    assert r.returncode != 0 and "in.jsonl:1" in r.stderr and "'topk'" in r.stderr
    inp.write_text('[1]\n{"input_ids": [3], "max_new_tokens": 0}\n')
    r = _run("--input", str(inp), "--max-new-tokens", "2", "--max-seq-len", "64")
    assert r.returncode != 0 and "in.jsonl:2" in r.stderr and "max_new_tokens" in r.stderr
    r = _run("--input", str(inp), "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_cli_beam_wider_than_the_default_cap(gpt2_dir, tmp_path):
    """A line asking for a beam wider than 4 widens the engine's max beam width (up to the slots)."""
    path, _ = gpt2_dir
    p = random_prompts(np.random.RandomState(6), 1, 3, 6)[0]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": p, "beam_width": 5}) + "\n" + json.dumps(p) + "\n")
    out = tmp_path / "out.jsonl"
    r = _run("--model", path, "--input", str(inp), "--output", str(out), "--dtype", "float32",
             "--max-batch-size", "6", "--max-new-tokens", "4", "--attention", "xla", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    a, b = [json.loads(line) for line in open(out)]
    cfg, params = load_gpt2(path)
    lib = ftjax.LLM(cfg, params, dtype="float32", attention="xla", max_batch_size=6, max_seq_len=64,
                    max_beam_width=5)
    want = lib.generate([p], max_new_tokens=4, beam_width=5)
    assert a["beams"] == want.beams[0] and a["output_ids"] == want.tokens[0] and "beams" not in b
