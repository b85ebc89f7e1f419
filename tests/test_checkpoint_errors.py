"""Broken checkpoints and bad destinations get a clear error naming the file / tensor / key (expected vs
found), from the library (ValueError) and from `python -m ftjax.convert` (one line, exit 2); the sharded
(tensor_parallel > 1) load of an ftjax dir checks keys and shapes as the one-device load does; convert
reports progress per HF shard and around the orbax write.

Every broken checkpoint is built here from a tiny random model (HF GPT-2 / T5, and the Megatron / FT
writers of test_checkpoint_formats.py)."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ftjax
from ftjax.checkpoint import load_checkpoint, orbax_io
from ftjax.convert import _heartbeat, convert, main
from tests.test_checkpoint_formats import _hf_model, write_ft, write_megatron


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF GPT-2 dir, torch model): 2 layers, d=32, 4 heads, f=64, vocab 96."""
    path = str(tmp_path_factory.mktemp("err_gpt2"))
    return path, _hf_model(path)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from tests.test_t5 import make_hf_t5

    path = str(tmp_path_factory.mktemp("err_t5"))
    make_hf_t5(path, seed=1)
    return path


@pytest.fixture(scope="module")
def ftjax_dir(gpt2, tmp_path_factory):
    """(ftjax dir converted from gpt2, cfg, float32 numpy params)."""
    dst = str(tmp_path_factory.mktemp("err_ftjax") / "ckpt")
    convert(gpt2[0], dst, progress=lambda m: None)
    cfg, params = load_checkpoint(gpt2[0])
    return dst, cfg, params


@pytest.fixture(scope="module")
def megatron(gpt2, tmp_path_factory):
    """A Megatron-LM tensor-parallel 2 checkpoint (release/mp_rank_0{0,1}) of gpt2."""
    return write_megatron(str(tmp_path_factory.mktemp("err_meg")), gpt2[1], version=3.0, T=2, layout="release")


def _copy(src, tmp_path, name="c"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_json(fn, fn_edit):
    with open(fn) as f:
        d = json.load(f)
    fn_edit(d)
    with open(fn, "w") as f:
        json.dump(d, f)


def _edit_safetensors(path, key, arr):
    from safetensors.numpy import load_file, save_file

    fn = os.path.join(path, "model.safetensors")
    t = load_file(fn)
    assert key in t
    t[key] = arr
    save_file(t, fn, metadata={"format": "pt"})


def _cli(capsys, *argv):
    """Runs `python -m ftjax.convert ARGV` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _load(path, T):
    return ftjax.load(path, dtype="float32", max_batch_size=1, max_seq_len=16, attention="xla", tensor_parallel=T)


# ------------------------------------------------------------------ 1. sharded load checks the metadata
@pytest.mark.parametrize("T", [1, 2])
def test_ftjax_load_checks_keys_and_shapes_on_any_layout(ftjax_dir, tmp_path, T):
    """tensor_parallel=2 restores through sharding/layout.py:load_sharded; it must refuse what T=1 refuses,
    by name, before reading any array."""
    good, cfg, params = ftjax_dir
    # (a) the config says 1 layer, 2 are stored: not a silently smaller model
    fewer = _copy(good, tmp_path, "fewer")
    _edit_json(os.path.join(fewer, "ftjax_config.json"), lambda m: m["config"].update(num_layers=1))
    with pytest.raises(ValueError, match=r"unexpected weights \['layers_1/.*fewer layers"):
        _load(fewer, T)
    # (b) a stored array is missing
    missing = str(tmp_path / "missing")
    orbax_io.save(missing, cfg, {**params, "final_norm": {"scale": params["final_norm"]["scale"]}})
    with pytest.raises(ValueError, match=re.escape("missing weights ['final_norm/bias']")):
        _load(missing, T)
    # (c) a stored array has the wrong shape
    shape = str(tmp_path / "shape")
    orbax_io.save(shape, cfg, {**params, "final_norm": {**params["final_norm"], "bias": np.zeros(33, np.float32)}})
    with pytest.raises(ValueError, match=re.escape("weight final_norm/bias has shape (33,), the config needs (32,)")):
        _load(shape, T)


def test_sharded_load_checks_before_restoring(ftjax_dir, tmp_path, monkeypatch):
    """The check reads orbax's metadata only: no restore is attempted on a mismatch; it names params/."""
    import orbax.checkpoint as ocp

    good, cfg, params = ftjax_dir
    p = str(tmp_path / "missing")
    orbax_io.save(p, cfg, {k: v for k, v in params.items() if k != "layers_1"})

    def boom(*a, **k):
        raise AssertionError("restore called")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", boom)
    with pytest.raises(ValueError, match=re.escape(os.path.join(p, "params")) + r": missing weights \['layers_1/"):
        _load(p, 2)


def test_ftjax_config_errors_name_the_file(ftjax_dir, tmp_path):
    good = ftjax_dir[0]
    bad = _copy(good, tmp_path, "badjson")
    with open(os.path.join(bad, "ftjax_config.json"), "w") as f:
        f.write('{"format": "ftjax", "form')
    for T in (1, 2):
        with pytest.raises(ValueError, match=r"ftjax_config\.json: not valid JSON"):
            _load(bad, T)
    nokey = _copy(good, tmp_path, "nokey")
    _edit_json(os.path.join(nokey, "ftjax_config.json"), lambda m: m["config"].pop("hidden"))
    with pytest.raises(ValueError, match=r"ftjax_config\.json: ftjax config: missing keys \['hidden'\]"):
        _load(nokey, 2)


# ------------------------------------------------------------------------ 2. convert: one line, exit 2
def test_convert_truncated_safetensors_subprocess(gpt2, tmp_path):
    """The real CLI: one `ftjax.convert: error:` line naming the file, exit 2, no traceback."""
    src = _copy(gpt2[0], tmp_path)
    os.truncate(os.path.join(src, "model.safetensors"), 2000)
    r = subprocess.run([sys.executable, "-m", "ftjax.convert", src, str(tmp_path / "out")], capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"ftjax.convert: error: {os.path.join(src, 'model.safetensors')}: " in r.stderr
    assert "truncated or corrupt" in r.stderr


def test_convert_broken_hf_sources(gpt2, t5, tmp_path, capsys):
    src, model = gpt2
    # truncated pytorch_model.bin
    binsrc = str(tmp_path / "bin")
    os.makedirs(binsrc)
    shutil.copy(os.path.join(src, "config.json"), binsrc)
    torch.save(model.state_dict(), os.path.join(binsrc, "pytorch_model.bin"))
    fn = os.path.join(binsrc, "pytorch_model.bin")
    os.truncate(fn, os.path.getsize(fn) // 2)
    rc, err = _cli(capsys, binsrc, tmp_path / "o1")
    assert rc == 2 and f"{fn}: cannot read the torch checkpoint, truncated or corrupt" in err, err
    # config.json without n_embd; T5's without d_model
    nokey = _copy(src, tmp_path, "nokey")
    _edit_json(os.path.join(nokey, "config.json"), lambda c: c.pop("n_embd"))
    rc, err = _cli(capsys, nokey, tmp_path / "o2")
    assert rc == 2 and f"{nokey}/config.json: model_type 'gpt2' needs the key 'n_embd'" in err, err
    t5nokey = _copy(t5, tmp_path, "t5nokey")
    _edit_json(os.path.join(t5nokey, "config.json"), lambda c: c.pop("d_model"))
    rc, err = _cli(capsys, t5nokey, tmp_path / "o3")
    assert rc == 2 and f"{t5nokey}/config.json: model_type 't5' needs the key 'd_model'" in err, err
    # an index without weight_map; one naming a shard that is not there
    idx = str(tmp_path / "idx")
    os.makedirs(idx)
    shutil.copy(os.path.join(src, "config.json"), idx)
    with open(os.path.join(idx, "model.safetensors.index.json"), "w") as f:
        f.write("{}")
    rc, err = _cli(capsys, idx, tmp_path / "o4")
    assert rc == 2 and "model.safetensors.index.json: expected a 'weight_map'" in err, err
    with open(os.path.join(idx, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}, f)
    rc, err = _cli(capsys, idx, tmp_path / "o5")
    assert rc == 2 and "model-00001-of-00002.safetensors" in err and "not in" in err, err
    # config.json that is not JSON
    badjson = _copy(src, tmp_path, "badjson")
    with open(os.path.join(badjson, "config.json"), "w") as f:
        f.write("{not json")
    rc, err = _cli(capsys, badjson, tmp_path / "o6")
    assert rc == 2 and f"{badjson}/config.json: not valid JSON" in err, err


def test_convert_broken_megatron_and_ft(gpt2, megatron, tmp_path, capsys):
    # rank 1 without 'model' (rank 0 fine)
    p = _copy(megatron, tmp_path, "meg_r1")
    r1 = os.path.join(p, "release", "mp_rank_01", "model_optim_rng.pt")
    torch.save({"foo": 1}, r1)
    rc, err = _cli(capsys, p, tmp_path / "o1")
    assert rc == 2 and f"{r1}: not a Megatron checkpoint (no 'model' entry" in err, err
    # FT config.ini without a section header
    ft = write_ft(str(tmp_path / "ft"), gpt2[1], T=2)
    ini = os.path.join(ft, "config.ini")
    with open(ini) as f:
        body = f.read().split("\n", 1)[1]   # drop "[gpt]"
    with open(ini, "w") as f:
        f.write(body)
    rc, err = _cli(capsys, ft, tmp_path / "o2")
    assert rc == 2 and f"{ini}: not a valid config.ini" in err and "section header" in err, err


def test_convert_checks_the_destination_before_reading(gpt2, ftjax_dir, tmp_path, capsys):
    """DST problems are reported first, even for a source that would fail: nothing is read or written."""
    src = _copy(gpt2[0], tmp_path, "src")
    broken = _copy(gpt2[0], tmp_path, "broken")
    _edit_json(os.path.join(broken, "config.json"), lambda c: c.pop("n_embd"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = _cli(capsys, broken, afile)
    assert rc == 2 and f"{afile}: exists and is not a directory" in err and "n_embd" not in err, err
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep")
    rc, err = _cli(capsys, broken, full)
    assert rc == 2 and f"{full}: the destination directory is not empty (it holds notes.txt)" in err, err
    assert sorted(os.listdir(full)) == ["notes.txt"]
    rc, err = _cli(capsys, src, ftjax_dir[0])
    assert rc == 2 and "already holds an ftjax checkpoint" in err, err
    for dst in (src, os.path.join(src, "sub")):
        before = sorted(os.listdir(src))
        rc, err = _cli(capsys, src, dst)
        assert rc == 2 and "the destination is the source" in err, err
        assert sorted(os.listdir(src)) == before
    # an empty existing directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _cli(capsys, src, empty)
    assert rc == 0, err
    assert orbax_io.is_ftjax_dir(str(empty))


# -------------------------------------------------------------- 3. tensors, ranks, files, keys by name
def test_hf_misshapen_tensors_are_named(gpt2, t5, tmp_path):
    src = gpt2[0]
    for key, arr, want in (("transformer.h.0.attn.c_proj.weight", np.zeros((32, 33), np.float32), "(32, 32)"),
                           ("transformer.h.0.attn.c_attn.bias", np.zeros((97,), np.float32), "(96,)"),
                           ("transformer.h.1.mlp.c_fc.weight", np.zeros((32, 65), np.float32), "(32, 64)")):
        p = _copy(src, tmp_path, key)
        _edit_safetensors(p, key, arr)
        with pytest.raises(ValueError, match=re.escape(f"{p}: weight {key} has shape {arr.shape}, expected {want}")):
            load_checkpoint(p)
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    p = _copy(t5, tmp_path, "t5q")
    _edit_safetensors(p, key, np.zeros((32, 33), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"weight {key} has shape (32, 33), expected (32, 32)")):
        load_checkpoint(p)


def test_megatron_errors_name_the_files(megatron, tmp_path):
    rank = os.path.join("release", "mp_rank_{:02d}", "model_optim_rng.pt")
    # per-rank widths that do not match
    p = _copy(megatron, tmp_path, "width")
    f1 = os.path.join(p, rank.format(1))
    ck = torch.load(f1, weights_only=False)
    ck["model"]["language_model"]["encoder"]["layers.0.mlp.dense_h_to_4h.weight"] = torch.zeros(31, 32)
    torch.save(ck, f1)
    with pytest.raises(ValueError, match=r"'encoder\.layers\.0\.mlp\.dense_h_to_4h\.weight' has different shapes") as e:
        load_checkpoint(p)
    assert f"{os.path.join(p, rank.format(0))}: (32, 32)" in str(e.value)
    assert f"{f1}: (31, 32)" in str(e.value)
    # latest_checkpointed_iteration.txt with garbage
    p = _copy(megatron, tmp_path, "latest")
    latest = os.path.join(p, "latest_checkpointed_iteration.txt")
    with open(latest, "w") as f:
        f.write("garbage")
    with pytest.raises(ValueError, match=re.escape(f"{latest}: expected 'release' or an iteration number, "
                                                   "found 'garbage'")):
        load_checkpoint(p)
    # a truncated rank file
    p = _copy(megatron, tmp_path, "trunc")
    f1 = os.path.join(p, rank.format(1))
    os.truncate(f1, os.path.getsize(f1) // 2)
    with pytest.raises(ValueError, match=re.escape(f"{f1}: cannot read the torch checkpoint")):
        load_checkpoint(p)


def test_ft_non_integer_values_name_the_key(gpt2, tmp_path):
    import configparser

    ft = write_ft(str(tmp_path / "ft"), gpt2[1], T=2)
    ini = os.path.join(ft, "config.ini")
    for key, val in (("head_num", "four"), ("tensor_para_size", "2x"), ("end_id", "eos"),
                     ("layernorm_eps", "tiny")):
        cp = configparser.ConfigParser()
        cp.read(ini)
        old = cp["gpt"][key]
        cp["gpt"][key] = val
        with open(ini, "w") as f:
            cp.write(f)
        with pytest.raises(ValueError, match=re.escape(f"[gpt] {key} = '{val}' is not") + ".*" + re.escape(ini)):
            load_checkpoint(ft)
        cp["gpt"][key] = old
        with open(ini, "w") as f:
            cp.write(f)
    load_checkpoint(ft)   # restored: loads again


# ------------------------------------------------------------------------------------------ 4. progress
def test_convert_progress_per_shard_and_around_the_write(gpt2, tmp_path):
    src = str(tmp_path / "sharded")
    gpt2[1].save_pretrained(src, max_shard_size="20KB")
    n = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
    assert n > 1 and os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    lines = []
    convert(src, str(tmp_path / "out"), progress=lines.append)
    shard_lines = [m for m in lines if m.startswith("read HF shard")]
    assert [m.split(":")[0] for m in shard_lines] == [f"read HF shard {i}/{n}" for i in range(1, n + 1)]
    assert all("MiB" in m for m in shard_lines)
    assert any(m.startswith("writing ") and "MiB" in m for m in lines)
    assert any(m.startswith("wrote ") and "MiB" in m and re.search(r"in \d+\.\ds", m) for m in lines)
    # while a long write runs, a line every few seconds tells how far it is
    beats = []
    with _heartbeat(beats.append, str(tmp_path / "out"), 2**20, every_s=0.02):
        time.sleep(0.2)
    assert beats and "still writing" in beats[0] and "MiB on disk" in beats[0]


# ---------------------------------------------------------------------------- unused source tensors
def test_unused_source_tensors_are_warned(gpt2, tmp_path, caplog):
    p = _copy(gpt2[0], tmp_path)
    _edit_json(os.path.join(p, "config.json"), lambda c: c.update(n_layer=1))
    with caplog.at_level(logging.WARNING, logger="ftjax"):
        cfg, _ = load_checkpoint(p)
    assert cfg.num_layers == 1
    assert any("not used by the model" in r.getMessage() and "h.1." in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftjax"):
        load_checkpoint(gpt2[0])
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


def test_ft_extra_layer_files_are_warned(gpt2, tmp_path, caplog):
    import configparser

    ft = write_ft(str(tmp_path / "ft"), gpt2[1], T=2)
    ini = os.path.join(ft, "config.ini")
    cp = configparser.ConfigParser()
    cp.read(ini)
    cp["gpt"]["num_layer"] = "1"
    with open(ini, "w") as f:
        cp.write(f)
    with caplog.at_level(logging.WARNING, logger="ftjax"):
        cfg, _ = load_checkpoint(ft)
    assert cfg.num_layers == 1
    assert any("files of layers [1]" in r.getMessage() and "num_layer is 1" in r.getMessage() for r in caplog.records)
