"""End-to-end generation latency (GPU): ftjax bf16 and int8 beside HF transformers (eager and static
cache) and the floor, in one run, on FasterTransformer's published GPT shapes and a LLaMA-3-8B shape.
Random bf16 weights; every requested token is generated (end_id=None, greedy).

  PYTHONUNBUFFERED=1 python bench/e2e.py [--cases all | 350m,1.3b-b1-512-32,...] [--skip-hf] [--skip-int8]
      [--reps 3] [--case-timeout 300] [--budget S] [--cache-demo] [--compile-cache DIR] [--out $OUT]
  python bench/e2e.py --smoke          # CPU: tiny shapes, every code path once (HF in float32 on CPU)

Per case: total latency of one request (`llm.generate`, prompt in -> all tokens on the host), median of
`--reps` after the first (which also compiles: "first request"); the prefill+insert and the decode step
timed apart through the engine (decode step = one `generate_steps` loop of out-1 steps / out-1);
HBM bytes of the weights and of the K/V cache; the compiled decode loop's temporaries (an int8 model
must not hold a dequantised copy of its weights).

Floor (per request) = max(prefill FLOPs / R, W / BW) + sum over the out-1 decode steps of
(W + K/V bytes read at that step) / BW, where W = weight bytes one step reads (all weights except the
position table and an untied token embedding, of which a step reads only b rows), K/V at step i =
b * layers * 2 * kv_heads * head_dim * 2 bytes * (in + i), BW = the measured device copy bandwidth
(read + write, bench/common.copy_bandwidth, best variant) and R = the measured bf16 matmul rate
(8192^3 jnp.dot). Prefill FLOPs = 2 * b * in * (matmul params per token) + 2 * b * layers * heads *
head_dim * in * (in + 1) (causal attention) + 2 * b * hidden * vocab (logits of the last token).

`--cache-demo`: before the cases, two fresh processes each time their first request of the first case
with jax's persistent compilation cache (ftjax.compile_cache) in one new directory: the second does
not compile. Results: a markdown table printed last; JSON (every row) in $OUT/e2e.json and
$OUT/e2e.jsonl when --out / $OUT is set.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU in this process

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

# ------------------------------------------------------------------------------------------ shapes
# name -> ModelConfig kwargs (ftjax.config.ModelConfig); eos/bos None: nothing ends a row early.
MODELS = {
    "350m": dict(vocab_size=50257, hidden=1024, num_layers=24, num_heads=16, ffn_dim=4096, max_positions=1024),
    "1.3b": dict(vocab_size=50257, hidden=2048, num_layers=24, num_heads=16, ffn_dim=8192, max_positions=2048),
    "6.7b": dict(vocab_size=50257, hidden=4096, num_layers=32, num_heads=32, ffn_dim=16384, max_positions=2048),
    "llama3-8b": dict(vocab_size=128256, hidden=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336,
                      max_positions=8192, activation="silu", gated_ffn=True, norm="rmsnorm", position="rotary",
                      rope_theta=500000.0, tie_embeddings=False, attn_bias=False, mlp_bias=False),
}
CASES = ([(m, b, i, o) for m in ("350m", "1.3b") for (i, o) in ((128, 8), (512, 32)) for b in (1, 64)]
         + [("6.7b", 1, 512, 32), ("llama3-8b", 1, 512, 32), ("llama3-8b", 64, 512, 32)])
SMOKE_MODELS = {
    "tiny-gpt": dict(vocab_size=512, hidden=64, num_layers=2, num_heads=4, ffn_dim=256, max_positions=128),
    "tiny-llama": dict(MODELS["llama3-8b"], vocab_size=512, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_dim=192, max_positions=128),
}
SMOKE_CASES = [("tiny-gpt", 2, 16, 4), ("tiny-llama", 2, 16, 4)]


def case_id(c):
    return f"{c[0]}-b{c[1]}-{c[2]}-{c[3]}"


def select_cases(spec: str, cases):
    if spec in ("all", ""):
        return list(cases)
    want = [s.strip() for s in spec.split(",") if s.strip()]
    out = [c for c in cases if any(case_id(c) == w or c[0] == w for w in want)]
    unknown = [w for w in want if not any(case_id(c) == w or c[0] == w for c in cases)]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; known: {[case_id(c) for c in cases]}")
    return out


def make_config(name, models):
    from ftjax.config import ModelConfig

    return ModelConfig(**models[name], bos_id=None, eos_id=None, pad_id=None)


# -------------------------------------------------------------------------------------- utilities
ROWS = []
OUT_DIR = None


def emit(row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    if OUT_DIR:
        with open(os.path.join(OUT_DIR, "e2e.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Soft per-case guard: SIGALRM raises at the next Python-level point (a compiled call in flight
    finishes first)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise CaseTimeout(f"over the {seconds}s case timeout")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def now():
    return time.perf_counter()


_NORMAL = {}


def random_params(cfg, dtype=None, seed=0):
    """Random params made on the device, leaf by leaf, from the model's abstract shapes (nothing on
    the host): norm scales 1, biases 0, everything else N(0, 0.02)."""
    import jax
    import jax.numpy as jnp

    from ftjax.models import gpt

    dtype = dtype or jnp.bfloat16
    shapes, _ = gpt.abstract_params(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, sd) in enumerate(leaves):
        last = str(getattr(path[-1], "key", path[-1]))
        if last == "scale":                       # norms
            out.append(jnp.ones(sd.shape, sd.dtype))
        elif last == "bias":
            out.append(jnp.zeros(sd.shape, sd.dtype))
        else:
            key = (tuple(sd.shape), jnp.dtype(sd.dtype))
            if key not in _NORMAL:
                _NORMAL[key] = jax.jit(lambda k, shape=key[0], dt=key[1]:
                                       (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt))
            out.append(_NORMAL[key](jax.random.key(seed * 100003 + i)))
    return jax.tree_util.tree_unflatten(treedef, out)


def nbytes(tree) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def step_weight_bytes(cfg, params) -> int:
    """Weight bytes one decode step reads: all but the position table and an untied token embedding."""
    skip = nbytes(params["embed"].get("positions", []))
    if not cfg.tie_embeddings:
        skip += nbytes(params["embed"]["tokens"])
    return nbytes(params) - skip


def matmul_params_per_token(cfg) -> int:
    d, n, k, h, f = cfg.hidden, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ffn_dim
    per_layer = d * n * h + 2 * d * k * h + n * h * d + (3 if cfg.gated_ffn else 2) * d * f
    return cfg.num_layers * per_layer


def floor_ms(cfg, b, t_in, t_out, w_bytes, bw, rate, kv_itemsize=2):
    L, k, h, n = cfg.num_layers, cfg.kv_heads, cfg.dim_per_head, cfg.num_heads
    flops = (2 * b * t_in * matmul_params_per_token(cfg) + 2 * b * L * n * h * t_in * (t_in + 1)
             + 2 * b * cfg.hidden * cfg.vocab_size)
    kv_tok = b * L * 2 * k * h * kv_itemsize
    prefill = max(flops / rate, (w_bytes + kv_tok * t_in) / bw)
    decode = sum((w_bytes + kv_tok * (t_in + i)) / bw for i in range(1, t_out))
    return {"floor_ms": 1e3 * (prefill + decode), "floor_prefill_ms": 1e3 * prefill,
            "floor_step_ms": 1e3 * w_bytes / bw, "prefill_gflop": flops / 1e9}


# ------------------------------------------------------------------------------------------- ftjax
def run_ftjax(cfg, params, case, reps, variant, bw, rate, hlo_memory=True, int8_layout="auto", fuse=None):
    import jax

    from ftjax.llm import LLM

    _, b, t_in, t_out = case
    rng = np.random.RandomState(0)
    prompts = rng.randint(1, cfg.vocab, size=(b, t_in)).tolist()
    t0 = now()
    llm = LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out, max_beam_width=1)
    llm.engine.int8_layout = int8_layout
    if fuse:
        llm.engine.fuse_decode = fuse
    build_s = now() - t0
    t0 = now()
    res = llm.generate(prompts, max_new_tokens=t_out, end_id=None)
    first_s = now() - t0
    assert all(len(t) == t_out for t in res.tokens), "not every step generated"
    lat = []
    for _ in range(reps):
        t0 = now()
        llm.generate(prompts, max_new_tokens=t_out, end_id=None)
        lat.append(now() - t0)
    eng = llm.engine
    plist = llm.sampling_params(b, end_id=None)
    st = llm._state
    pre, step = [], []
    for rep in range(reps + 1):   # the first round compiles the (t_out - 1)-step loop: not counted
        t0 = now()
        st = eng.prefill_insert(st, prompts, list(range(b)), [t_out] * b, plist)
        jax.block_until_ready(st.seq)
        if rep:
            pre.append(now() - t0)
        if t_out > 1:
            t0 = now()
            st, n = eng.generate_steps(st, t_out - 1)
            jax.block_until_ready(st.seq)
            if rep:
                step.append((now() - t0) / max(1, int(n)))
    llm._state = st
    w = nbytes(eng.params)
    w_step = step_weight_bytes(cfg, eng.params)
    row = {"case": case_id(case), "impl": f"ftjax-{variant}", "total_ms": 1e3 * statistics.median(lat),
           "all_ms": [round(1e3 * x, 3) for x in lat], "first_request_s": first_s, "engine_build_s": build_s,
           "compile_s_approx": first_s - statistics.median(lat),
           "prefill_insert_ms": 1e3 * statistics.median(pre),
           "decode_step_ms": 1e3 * statistics.median(step) if step else None,
           "weight_bytes": w, "step_weight_bytes": w_step, "kv_cache_bytes": nbytes(st.cache),
           "step_weights_over_bw_ms": 1e3 * w_step / bw}
    if row["decode_step_ms"]:
        row["step_vs_weights_bw"] = row["decode_step_ms"] / row["step_weights_over_bw_ms"]
    row.update(floor_ms(cfg, b, t_in, t_out, w_step, bw, rate))
    row["x_floor"] = row["total_ms"] / row["floor_ms"]
    if hlo_memory:   # the compiled decode loop's temporaries (persistent cache: no second compile)
        try:
            mem = eng._generate.lower(eng.params, st, np.int32(1), rem=0, chunked=True,
                                     beam=False).compile().memory_analysis()
            row["decode_loop_temp_bytes"] = int(mem.temp_size_in_bytes)
        except Exception as e:  # noqa: BLE001
            row["decode_loop_temp_bytes"] = f"n/a ({type(e).__name__})"
    try:
        stats = jax.devices()[0].memory_stats() or {}
        row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001
        pass
    del llm, eng, st
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------------- HF
def hf_model(cfg, device):
    import torch
    import transformers

    if cfg.gated_ffn:
        hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden,
                                      intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                                      max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta,
                                      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_bias=False,
                                      mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        cls = transformers.LlamaForCausalLM
    else:
        hc = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden,
                                     n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_dim,
                                     activation_function="gelu_new", bos_token_id=None, eos_token_id=None,
                                     pad_token_id=0)
        cls = transformers.GPT2LMHeadModel
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hc).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def run_hf(model, cfg, case, reps, static, device):
    import torch

    _, b, t_in, t_out = case
    ids = torch.from_numpy(np.random.RandomState(0).randint(1, cfg.vocab, size=(b, t_in))).to(device)
    mask = torch.ones_like(ids)
    kw = dict(min_new_tokens=t_out, max_new_tokens=t_out, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"

    def go():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    t0 = now()
    out = go()
    first = now() - t0
    assert out.shape[1] == t_in + t_out, f"HF generated {out.shape[1] - t_in} tokens, wanted {t_out}"
    if static:
        go()   # torch.compile may specialise again on the second call
    lat = []
    for _ in range(reps):
        t0 = now()
        go()
        lat.append(now() - t0)
    return {"case": case_id(case), "impl": "hf-static" if static else "hf-eager",
            "total_ms": 1e3 * statistics.median(lat), "all_ms": [round(1e3 * x, 3) for x in lat],
            "first_request_s": first}


# ---------------------------------------------------------------------------------- cache demo
def child_first_request(args, models, cases):
    """--child: one process, persistent cache on, times its first request of one case (bf16)."""
    from ftjax import compile_cache

    compile_cache.enable(args.compile_cache)
    import jax

    from ftjax.llm import LLM

    case = select_cases(args.child, cases)[0]
    cfg = make_config(case[0], models)
    params = random_params(cfg)
    jax.block_until_ready(params)
    _, b, t_in, t_out = case
    prompts = np.random.RandomState(0).randint(1, cfg.vocab, size=(b, t_in)).tolist()
    llm = LLM(cfg, params, dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out, max_beam_width=1)
    t0 = now()
    llm.generate(prompts, max_new_tokens=t_out, end_id=None)
    first = now() - t0
    t0 = now()
    llm.generate(prompts, max_new_tokens=t_out, end_id=None)
    print("CHILD " + json.dumps({"case": case_id(case), "first_request_s": first, "second_request_s": now() - t0,
                                 "cache_entries": compile_cache.entries()}), flush=True)


def cache_demo(args, case):
    d = tempfile.mkdtemp(prefix="ftjax_cc_")
    res = {"case": case_id(case), "impl": "compile-cache-demo", "cache_dir": d}
    for k in ("first_process", "second_process"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case_id(case), "--compile-cache", d]
        if args.smoke:
            cmd.append("--smoke")
        if args.set:
            cmd += ["--set", *args.set]
        t0 = now()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout or None)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")]
        if p.returncode or not line:
            res[k] = {"error": (p.stderr or p.stdout)[-800:]}
        else:
            res[k] = json.loads(line[-1][6:]) | {"process_wall_s": now() - t0}
    emit(res)
    return res


# --------------------------------------------------------------------------------------- report
def table(cases, rows, header):
    by = {(r["case"], r["impl"]): r for r in rows if "case" in r and "impl" in r}

    def g(c, impl, key, fmt="{:.1f}"):
        r = by.get((case_id(c), impl))
        if r is None:
            return "–"
        if "error" in r:
            return "err"
        v = r.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "–"

    lines = [header, "",
             "| case | ftjax bf16 | ftjax int8 | HF eager | HF static | floor | bf16 ×floor | "
             "b-step bf16 ms (×W/BW) | int8/bf16 step | first req s | weights GiB bf16/int8 | K/V MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        cid = case_id(c)
        bf, i8 = by.get((cid, "ftjax-bf16"), {}), by.get((cid, "ftjax-int8"), {})
        step = "–"
        if isinstance(bf.get("decode_step_ms"), float):
            step = f"{bf['decode_step_ms']:.3f} ({bf.get('step_vs_weights_bw', 0):.2f}×)"
        ratio = "–"
        if isinstance(bf.get("decode_step_ms"), float) and isinstance(i8.get("decode_step_ms"), float):
            ratio = f"{i8['decode_step_ms'] / bf['decode_step_ms']:.2f}"
        wgib = "–"
        if "weight_bytes" in bf or "weight_bytes" in i8:
            wgib = (f"{bf.get('weight_bytes', 0) / 2**30:.2f}/" if "weight_bytes" in bf else "–/") + \
                   (f"{i8['weight_bytes'] / 2**30:.2f}" if "weight_bytes" in i8 else "–")
        kv = f"{bf['kv_cache_bytes'] / 2**20:.0f}" if "kv_cache_bytes" in bf else "–"
        floor = bf.get("floor_ms") or i8.get("floor_ms")
        lines.append(f"| {cid} | {g(c, 'ftjax-bf16', 'total_ms')} | {g(c, 'ftjax-int8', 'total_ms')} | "
                     f"{g(c, 'hf-eager', 'total_ms')} | {g(c, 'hf-static', 'total_ms')} | "
                     f"{'–' if floor is None else f'{floor:.1f}'} | {g(c, 'ftjax-bf16', 'x_floor', '{:.2f}')} | "
                     f"{step} | {ratio} | {g(c, 'ftjax-bf16', 'first_request_s')} | {wgib} | {kv} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv=None):
    global OUT_DIR
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="all", help="'all', or comma-separated case ids / model names "
                    f"(ids: {', '.join(case_id(c) for c in CASES)})")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--int8-mode", default="int8", choices=["int8", "int8-embed"],
                    help="the int8 column's ftjax.quantize mode (int8-embed: the token embedding / tied head too)")
    ap.add_argument("--int8-layout", default="auto", choices=["auto", "kn", "nk"],
                    help="Engine.int8_layout: auto (transposed, QuantizedWeightT, when the small-M kernel runs), "
                    "kn (QuantizedWeight), nk (QuantizedWeightT)")
    ap.add_argument("--fuse", default=None, help="Engine.fuse_decode for the ftjax runs (stats: a kernel per op, "
                    "layer: a persistent kernel per decoder layer; default: the engine's)")
    ap.add_argument("--skip-ftjax", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--case-timeout", type=float, default=300, help="seconds per case and implementation (soft)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds for the whole run: cases not started by then are skipped (0: no limit)")
    ap.add_argument("--cache-demo", action="store_true",
                    help="first request of the first case in two fresh processes sharing a persistent cache")
    ap.add_argument("--compile-cache", default=None,
                    help="persistent compilation cache dir (default: a fresh temporary one, so first-request "
                         "times include compiling)")
    ap.add_argument("--no-hlo-memory", action="store_true", help="skip the compiled decode-loop memory analysis")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized models and cases")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--set", nargs="*", default=[], help="module globals for the ftjax runs, each "
                    "'module.attr:value' (bench/step_ab.py's syntax), e.g. ftjax.layers.attention.PACKED_QKV:True")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.set:
        from bench.step_ab import apply_set_args

        apply_set_args(args.set)

    models, all_cases = (SMOKE_MODELS, SMOKE_CASES) if args.smoke else (MODELS, CASES)
    if args.child:
        return child_first_request(args, models, all_cases)
    cases = select_cases(args.cases, all_cases)
    if args.out:
        OUT_DIR = args.out
        os.makedirs(OUT_DIR, exist_ok=True)
        open(os.path.join(OUT_DIR, "e2e.jsonl"), "w").close()

    if args.cache_demo and cases:
        cache_demo(args, cases[0])

    from ftjax import compile_cache

    cdir = compile_cache.enable(args.compile_cache or tempfile.mkdtemp(prefix="ftjax_e2e_cc_"))
    import jax

    from bench.common import copy_bandwidth, device_info, matmul_rate
    from ftjax import quantize as Q

    bws = copy_bandwidth(2**24 if args.smoke else 2 * 2**30)
    bw = max(bws.values())
    rate = matmul_rate(256 if args.smoke else 8192)
    env = {"impl": "env", "device": device_info(), "copy_bandwidth_GBps": {k: v / 1e9 for k, v in bws.items()},
           "bw_GBps": bw / 1e9, "bf16_matmul_TFLOPs": rate / 1e12, "compile_cache": cdir,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    try:
        import torch
        import transformers
        env |= {"torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.cuda.is_available()}
    except ImportError:
        args.skip_hf = True
    emit(env)
    device = "cuda" if (not args.skip_hf and __import__("torch").cuda.is_available()) else "cpu"

    def guarded(fn, case, impl):
        try:
            with time_limit(args.case_timeout):
                row = fn()
        except Exception as e:  # noqa: BLE001 — one failing case must not end the run
            row = {"case": case_id(case), "impl": impl, "error": f"{type(e).__name__}: {e}"[:600]}
            traceback.print_exc()
        emit(row)
        gc.collect()

    t_start = now()

    def over_budget(c, impl):
        if args.budget and now() - t_start > args.budget:
            emit({"case": case_id(c), "impl": impl, "error": f"skipped: over the --budget of {args.budget:.0f}s"})
            return True
        return False

    # Per model: HF first (torch's cache is emptied after it; jax's pool only grows), then ftjax.
    for model in dict.fromkeys(c[0] for c in cases):
        mcases = [c for c in cases if c[0] == model]
        cfg = make_config(model, models)
        if not args.skip_hf:
            import torch

            model_t = hf_model(cfg, device)
            for c in mcases:
                for static in (False, True):
                    impl = "hf-static" if static else "hf-eager"
                    if not over_budget(c, impl):
                        guarded(lambda c=c, s=static: run_hf(model_t, cfg, c, args.reps, s, device), c, impl)
            del model_t
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_ftjax:
            t0 = now()
            params = random_params(cfg)
            jax.block_until_ready(params)
            emit({"model": model, "impl": "init", "random_params_s": now() - t0, "bf16_bytes": nbytes(params)})
            for c in mcases:
                if not over_budget(c, "ftjax-bf16"):
                    guarded(lambda c=c: run_ftjax(cfg, params, c, args.reps, "bf16", bw, rate,
                                                  not args.no_hlo_memory, fuse=args.fuse), c, "ftjax-bf16")
            if not args.skip_int8:
                params = Q.quantize_params(params, cfg, scale_dtype=jax.numpy.bfloat16, delete_source=True,
                                           mode=args.int8_mode)
                jax.block_until_ready(params)
                for c in mcases:
                    if not over_budget(c, "ftjax-int8"):
                        guarded(lambda c=c: run_ftjax(cfg, params, c, args.reps, "int8", bw, rate,
                                                      not args.no_hlo_memory, args.int8_layout, args.fuse), c,
                                "ftjax-int8")
            del params
            gc.collect()

    header = (f"**e2e** {env['device']}, copy BW {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s, "
              f"median of {args.reps}, ms per request; {env['time']}")
    md = table(cases, ROWS, header)
    demo = [r for r in ROWS if r.get("impl") == "compile-cache-demo"]
    for r in demo:
        f, s = r.get("first_process", {}), r.get("second_process", {})
        md += (f"\n\ncompile cache ({r['case']}): first request {f.get('first_request_s', float('nan')):.2f} s in a "
               f"fresh process, {s.get('first_request_s', float('nan')):.2f} s in the next process "
               f"(steady {s.get('second_request_s', float('nan')):.3f} s)")
    errs = [r for r in ROWS if "error" in r]
    if errs:
        md += "\n\nerrors: " + "; ".join(f"{r['case']} {r['impl']}: {r['error'][:120]}" for r in errs)
    if OUT_DIR:
        with open(os.path.join(OUT_DIR, "e2e.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
        with open(os.path.join(OUT_DIR, "e2e.md"), "w") as f:
            f.write(md + "\n")
    print("\n" + md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
