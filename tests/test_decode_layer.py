"""The persistent layer kernel (ftjax/pallas/decode_layer.py), interpreted on CPU, against its float32 twin
and, in a whole model, against XLA's decode step.

Interpret mode runs programs one after another, so a program cannot wait for a later one: the kernel runs
either as ONE program doing every phase, or phase by phase with several programs (the stream-K split, the
partial slots and the last-arriver fixups across programs). Real concurrency is tests/gpu/check_layer.py's.
The kernel also lowers for CUDA here (jax.export runs the Triton lowering in Python)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import ftjax
from ftjax import quantize as Q
from ftjax.config import ModelConfig
from ftjax.models import gpt
from ftjax.pallas import decode_layer as L

def make_case(seed, *, M=2, D=64, n=4, kvh=4, h=16, F=128, s=64, dtype=jnp.float32, norm="layernorm",
              bias=True, gated=False, rotary=False, int8=None):
    """Random inputs of one layer: x, k_cache, v_cache, positions (row 0 at the last slot, row 1 at 0),
    LayerParams, trans flags. int8: None, "kn" ([K, N] int8) or "t" (stored [N, K])."""
    rng = np.random.RandomState(seed)

    def r(shape, sc=0.2):
        return jnp.asarray(rng.randn(*shape) * sc, dtype)

    vals, trans = {}, []
    dims = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
    for name, (K, N) in zip(L.WEIGHTS, dims):
        w = rng.randn(K, N) / np.sqrt(K)
        if int8:
            sc = np.abs(w).max(0) / 127.0 + 1e-8
            q = np.clip(np.round(w / sc), -127, 127).astype(np.int8)
            vals[f"w{name}"], vals[f"s{name}"] = jnp.asarray(q.T if int8 == "t" else q), jnp.asarray(sc, dtype)
            trans.append(int8 == "t")
        else:
            vals[f"w{name}"], vals[f"s{name}"] = jnp.asarray(w, dtype), None
            trans.append(False)
        vals[f"b{name}"] = r((N,)) if bias else None
    for i in (1, 2):
        vals[f"ln{i}_g"] = 1 + r((D,), 0.1)
        vals[f"ln{i}_b"] = r((D,)) if norm == "layernorm" else None
    if rotary:
        vals["rope"] = jnp.asarray(1.0 / (10000.0 ** (np.arange(0, h, 2) / h)), jnp.float32)
    pos = rng.randint(0, s, size=M)
    pos[0] = s - 1
    if M > 1:
        pos[1] = 0
    return (r((M, D), 1.0), r((M, kvh, s, h), 1.0), r((M, kvh, s, h), 1.0), jnp.asarray(pos, jnp.int32),
            L.LayerParams(**vals), tuple(trans))


TRITON = "__gpu$xla.gpu.triton"


def _f(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


def assert_matches(out, ref, dtype, what):
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for i, name in ((0, "x_out"), (2, "k_cache"), (3, "v_cache")):
        scale = np.abs(_f(ref[i])).max() + 1e-6
        err = np.abs(_f(out[i]) - _f(ref[i])).max() / scale
        assert err < tol, f"{what}: {name} relative error {err:.3g} >= {tol}"
    st, rst = _f(out[1]).sum(-1), _f(ref[1]).sum(-1)
    err = (np.abs(st - rst) / (np.abs(rst) + 1.0)).max()
    assert err < tol * 10, f"{what}: row statistics relative error {err:.3g}"
    assert int(np.abs(np.asarray(out[4])).sum()) == 0, f"{what}: the counters were not left zeroed"


# (GQA with RMSNorm and no biases is in "llama"; gated int8 [N, K] and the prenorm phases in "40rows-...";
# bf16, 16 rows and dims that are no multiple of the tiles in "bf16-16rows-ragged"; one row (batch 1) with MQA:
# the layer kernel is opt-in and measured slower (bench/RESULTS.md), so its CPU time in the suite is kept
# to the cases that each exercise something the others do not.)
CASES = {
    "gpt2": dict(),
    "llama": dict(M=4, kvh=2, rotary=True, gated=True, norm="rmsnorm", bias=False),
    "1row-mqa-rotary-int8kn": dict(M=1, kvh=1, rotary=True, int8="kn"),
    "bf16-16rows-ragged": dict(M=16, D=80, F=96, h=32, n=2, kvh=2, dtype=jnp.bfloat16),
    "40rows-llama-int8t": dict(M=40, kvh=2, rotary=True, gated=True, norm="rmsnorm", bias=False, int8="t"),
}


# programs phase by phase besides the single program: 3, or 7 for "gpt2" (more programs than some of its
# weights have tiles); one size a case (suite time)
GRIDS = {"gpt2": (7,)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_kernel_matches_reference(case):
    """One program doing every phase, and several programs phase by phase (tiles of 1 KB so that every
    weight is split over several programs and column blocks collect several partials)."""
    seed = np.random.randint(1 << 30)
    kw = dict(CASES[case])
    extra = kw.pop("cfg", {})
    x, kc, vc, pos, p, trans = make_case(seed, **kw)
    norm = kw.get("norm", "layernorm")
    act = "silu" if kw.get("gated") else "gelu_tanh"
    st = L.row_stats(x)
    ref = L.decode_layer_reference(x, st, pos, kc, vc, p, trans=trans, norm=norm, act=act)
    for P, phased in ((1, False),) + tuple((g, True) for g in GRIDS.get(case, (3,))):
        cfg = L.LayerConfig(programs=P, tile_bytes=1024, **extra)
        cnt = L.layer_counters(x, kc, p, trans, config=cfg, interpret=True)
        out = L.decode_layer(x, st, pos, kc, vc, cnt, p, trans=trans, norm=norm, act=act, config=cfg,
                             interpret=True, phased=phased)
        assert_matches(out, ref, x.dtype, f"{case} P={P} phased={phased} seed={seed}")


def test_prefetch_leaves_results_unchanged():
    """LayerConfig.prefetch_tiles: waiting programs load weight tiles (and the next layer's q/k/v tiles) into
    the L2; the outputs stay the twin's, and the loads (and spin_sleep_ns's sleeps) lower for CUDA."""
    seed = np.random.randint(1 << 30)
    x, kc, vc, pos, p, trans = make_case(seed, kvh=2)
    st = L.row_stats(x)
    ref = L.decode_layer_reference(x, st, pos, kc, vc, p, trans=trans)
    nxt = (p.wq, p.wk, p.wv)
    for P, phased in ((1, False), (3, True)):
        cfg = L.LayerConfig(programs=P, tile_bytes=1024, prefetch_tiles=2)
        cnt = L.layer_counters(x, kc, p, trans, config=cfg, interpret=True)
        out = L.decode_layer(x, st, pos, kc, vc, cnt, p, trans=trans, config=cfg, interpret=True, phased=phased,
                             next_qkv=nxt)
        assert_matches(out, ref, x.dtype, f"prefetch P={P} seed={seed}")
    cfg = L.LayerConfig(programs=132, prefetch_tiles=2, spin_sleep_ns=64)
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    cnt = L.layer_counters(x, kc, p, trans, config=cfg)
    fn = lambda *a: L.decode_layer(*a[:7], trans=trans, config=cfg, next_qkv=a[7])  # noqa: E731
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
        *(jax.tree.map(sds, a) for a in (x, st, pos, kc, vc, cnt, p, nxt)))
    assert exp.mlir_module().count(TRITON) == 1


def test_traced_launch_matches_and_stamps_every_phase():
    """decode_layer_traced: the same outputs, a stamp row per program with every phase's events (interpreted,
    the stamps are placeholders: the event numbers), and the clock reads lower for CUDA."""
    seed = np.random.randint(1 << 30)
    x, kc, vc, pos, p, trans = make_case(seed, kvh=2)
    st = L.row_stats(x)
    ref = L.decode_layer_reference(x, st, pos, kc, vc, p, trans=trans)
    cfg = L.LayerConfig(programs=1, tile_bytes=1024)
    cnt = L.layer_counters(x, kc, p, trans, config=cfg, interpret=True)
    out, tr = L.decode_layer_traced(x, st, pos, kc, vc, cnt, p, trans=trans, config=cfg, interpret=True)
    assert_matches(out, ref, x.dtype, f"traced seed={seed}")
    tr = np.asarray(tr)
    assert tr.shape == (1, L.TRACE_EVENTS)
    for name in ("qkv_done", "attn_wait", "attn_done", "o_wait", "o_done", "fc1_wait", "fc1_done", "fc2_wait",
                 "fc2_done", "exit"):
        assert tr[0, L.EV[name]] == L.EV[name], (name, tr)
    cfg = L.LayerConfig(programs=132)
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    cnt = L.layer_counters(x, kc, p, trans, config=cfg)
    fn = lambda *a: L.decode_layer_traced(*a, trans=trans, config=cfg)[1]  # noqa: E731
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
        *(jax.tree.map(sds, a) for a in (x, st, pos, kc, vc, cnt, p)))
    assert exp.mlir_module().count(TRITON) == 1


def test_stream_k_split_covers_every_tile_once():
    """plan_phase over random shapes: each weight's programs hold consecutive, non-empty ranges that cover its
    (column block, K block) iterations exactly once; a column block's contributors are consecutive programs,
    at most `slots` of them; weights of a phase get disjoint program ranges (when there are enough)."""
    rng = np.random.RandomState(np.random.randint(1 << 30))
    for _ in range(200):
        P = int(rng.randint(1, 300))
        shapes = [(int(rng.randint(16, 3000)), int(rng.randint(16, 3000)), int(rng.choice([1, 2, 4])), bool(rng.rand() < .3))
                  for _ in range(int(rng.randint(1, 4)))]
        plans = L.plan_phase(P, shapes, 0, L.DEFAULT_CONFIG)
        used = set()
        for w in plans:
            assert 1 <= w.P <= min(P, w.T) and w.p0 + w.P <= P
            ranges = [(q * w.T // w.P, (q + 1) * w.T // w.P) for q in range(w.P)]
            assert all(hi > lo for lo, hi in ranges) and ranges[0][0] == 0 and ranges[-1][1] == w.T
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            for j in range(w.nb):
                qf, ql = L._span(w, j)
                owners = {q for q, (lo, hi) in enumerate(ranges) if lo < (j + 1) * w.nkb and hi > j * w.nkb}
                assert owners == set(range(qf, ql + 1)) and ql - qf + 1 <= w.slots
            if len(plans) <= P:
                progs = set(range(w.p0, w.p0 + w.P))
                assert not progs & used
                used |= progs


def test_bad_inputs_name_what_is_wrong():
    x, kc, vc, pos, p, trans = make_case(0)
    st = L.row_stats(x)
    cnt = L.layer_counters(x, kc, p, interpret=True)
    with pytest.raises(AssertionError, match="rows"):
        x65 = jnp.zeros((65, x.shape[1]), x.dtype)
        L.decode_layer(x65, L.row_stats(x65), jnp.zeros((65,), jnp.int32), jnp.zeros((65,) + kc.shape[1:]),
                       jnp.zeros((65,) + kc.shape[1:]), cnt, p, interpret=True)
    with pytest.raises(AssertionError, match="wo.shape"):
        L.decode_layer(x, st, pos, kc, vc, cnt, p._replace(wo=p.wo[:-1]), interpret=True)
    with pytest.raises(AssertionError, match="ln1_b"):
        L.decode_layer(x, st, pos, kc, vc, cnt, p, norm="rmsnorm", interpret=True)
    with pytest.raises(AssertionError, match="counters"):
        L.decode_layer(x, st, pos, kc, vc, cnt[:-1], p, interpret=True)
    with pytest.raises(AssertionError, match="head_dim"):
        kc24 = jnp.zeros(kc.shape[:3] + (24,), kc.dtype)
        L.decode_layer(x, st, pos, kc24, kc24, cnt, p, interpret=True)


@pytest.mark.parametrize("shape", ["1.3b-bf16", "1.3b-int8t", "1.3b-64rows-int8t", "llama-gqa-int8kn"])
def test_layer_kernel_lowers_for_cuda(shape):
    """The Triton lowering (not the interpreter) takes the kernel at real sizes: the grid of one program per SM."""
    sd = jax.ShapeDtypeStruct
    if shape.startswith("1.3b"):
        M, D, n, kvh, h, F, gated, rotary, norm = 2, 2048, 16, 16, 128, 8192, False, False, "layernorm"
        M = 64 if "64rows" in shape else M
    else:
        M, D, n, kvh, h, F, gated, rotary, norm = 5, 1024, 8, 2, 128, 2816, True, True, "rmsnorm"
    int8 = "int8" in shape
    t = shape.endswith("int8t")
    bf = jnp.bfloat16
    dims = [(D, n * h), (D, kvh * h), (D, kvh * h), (n * h, D), (D, F), (F, D)] + ([(D, F)] if gated else [])
    vals = {}
    for name, (K, N) in zip(L.WEIGHTS, dims):
        vals[f"w{name}"] = sd((N, K) if t else (K, N), jnp.int8 if int8 else bf)
        vals[f"s{name}"] = sd((N,), bf) if int8 else None
        vals[f"b{name}"] = sd((N,), bf) if norm == "layernorm" else None
    for i in (1, 2):
        vals[f"ln{i}_g"] = sd((D,), bf)
        vals[f"ln{i}_b"] = sd((D,), bf) if norm == "layernorm" else None
    vals["rope"] = sd((h // 2,), jnp.float32) if rotary else None
    p = L.LayerParams(**vals)
    trans = (t,) * len(dims)
    cfg = L.LayerConfig(programs=132)
    x, kc = sd((M, D), bf), sd((M, kvh, 640, h), bf)
    plan = L.layer_plan(x, kc, p, trans, cfg, interpret=False)
    args = (x, sd((2, M, 1), jnp.float32), sd((M,), jnp.int32), kc, kc, sd((plan.n_counters,), jnp.int32), p)
    fn = lambda *a: L.decode_layer(*a, trans=trans, norm=norm, act="silu" if gated else "gelu_tanh",  # noqa: E731
                                   config=cfg)
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    assert exp.mlir_module().count(TRITON) == 1


MODELS = {
    "gpt2": dict(),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


def _llm(cfg, params, small_m, fuse, batch=3):
    llm = ftjax.LLM(cfg, params, dtype="float32", attention="pallas", max_batch_size=batch, max_seq_len=48)
    llm.engine.small_m = small_m
    llm.engine.fuse_decode = fuse
    return llm


# (one engine case: the GPT-2-like block's kernel is held to its twin by test_layer_kernel_matches_reference;
# the layer kernel is opt-in, so the suite's CPU time goes to the case with the most in it)
@pytest.mark.parametrize("family,int8,batch", [("llama", True, 20)])
def test_decode_with_layer_kernel_matches_xla(family, int8, batch):
    """Engine.fuse_decode = "layer": every block of the decode step is one layer-kernel launch (interpreted),
    with the same greedy tokens and log probs as XLA's step; int8 weights in the engine's layout for the
    kernel (stored transposed); 20 rows: past the kernel-per-op fused path's 16."""
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **MODELS[family])
    params = gpt.init_params(cfg, seed=seed % 1000)
    if int8:
        params = Q.quantize_params(params, cfg)
    prompts = [list(r) for r in np.random.RandomState(seed % 997).randint(2, 300, size=(batch, 7))]
    ref = _llm(cfg, params, False, True, batch).generate(prompts, max_new_tokens=5, end_id=None,
                                                         return_log_probs=True)
    llm = _llm(cfg, params, True, "layer", batch)
    got = llm.generate(prompts, max_new_tokens=5, end_id=None, return_log_probs=True)
    assert got.tokens == ref.tokens, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(got.output_log_probs, np.float32),
                               np.asarray(ref.output_log_probs, np.float32), atol=2e-4, rtol=1e-4)
    # the step really runs the layer kernel, once per block
    eng = llm.engine
    txt = str(jax.make_jaxpr(lambda s: eng._generate_fn(eng.params, s, 0, rem=1, chunked=False, beam=False,
                                                        sampled=False))(eng.init_state()))
    assert len(re.findall(r"name=_decode_layer\b", txt)) == cfg.num_layers, "the layer kernel is not in the step"


def test_decode_fuse_from_the_environment(monkeypatch):
    """FTJAX_DECODE_FUSE picks an engine's decode path for a whole process (a server, a benchmark); a bad
    value is refused by name."""
    from ftjax.engine import decode_fuse_from_env

    monkeypatch.delenv("FTJAX_DECODE_FUSE", raising=False)
    assert decode_fuse_from_env() is True
    for name, want in (("layer", "layer"), ("off", False), ("STATS", True)):
        monkeypatch.setenv("FTJAX_DECODE_FUSE", name)
        assert decode_fuse_from_env() == want
    monkeypatch.setenv("FTJAX_DECODE_FUSE", "fast")
    with pytest.raises(ValueError, match="FTJAX_DECODE_FUSE"):
        decode_fuse_from_env()
