"""Decode-step time and per-call cost, A/B over XLA flags and engine options, each variant in its own
process (XLA_FLAGS must be set before jax starts).

    PYTHONUNBUFFERED=1 python bench/step_ab.py --models 350m,1.3b --batch 1 \
        --variants 'default=' 'exhaustive=--xla_gpu_exhaustive_tiling_search=true'

Per (variant, model, weights): the decode step in ms, from the difference of two calls of
`generate_steps` (64 and 16 steps: fixed costs cancel), and the wall time of short calls (1, 7 and 15
steps) including their fixed cost, for the engine's step-count modes. Random bf16 weights
(bench/e2e.py's models and `random_params`; tiny-gpt is a CPU smoke), prompt 128 (tiny-gpt: 32),
every slot live. Results as JSON lines, with a table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def child(a):
    import jax
    import numpy as np

    import ftjax
    from bench.e2e import MODELS, SMOKE_MODELS, random_params
    from ftjax import quantize as Q
    from ftjax.config import ModelConfig

    from ftjax.pallas import small_linear as SL

    sls = [parse_sl(v) for v in a.sl]
    for model in a.models.split(","):
        cfg = ModelConfig(**{**MODELS, **SMOKE_MODELS}[model])
        base = random_params(cfg)
        for wq, sm, (sl_name, sl_cfg, sl_sets) in [(w, m, c) for w in a.weights.split(",")
                                                   for m in a.small_m.split(",") for c in sls]:
            SL.DEFAULT_CONFIG = sl_cfg
            restore = apply_sets(sl_sets)
            params = base if wq == "bf16" else Q.quantize_params(base, cfg, scale_dtype=jax.numpy.bfloat16,
                                                                 mode="int8-embed" if wq == "int8e" else "int8")
            S = min(512, cfg.max_positions)
            P = a.prompt or min(128, S // 4)
            assert P + 64 < S, f"--prompt {P}: a 64-step call must fit the {S}-token cache"
            llm = ftjax.LLM(cfg, params, dtype="bfloat16", max_batch_size=a.batch, max_seq_len=S,
                            attention=a.attention)
            eng = llm.engine
            eng.int8_layout = INT8_LAYOUTS.get(wq, "auto")
            if sm != "auto":
                eng.small_m = sm != "off"
                eng.fuse_decode = {"on": False, "fused": True}.get(sm, sm)
            rng = np.random.RandomState(0)
            prompts = [rng.randint(2, cfg.vocab_size, size=P).tolist() for _ in range(a.batch)]
            plist = llm.sampling_params(a.batch, end_id=None)

            def fresh():
                st = eng.init_state()
                st = eng.prefill_insert(st, prompts, list(range(a.batch)), [S - P - 1] * a.batch, plist)
                jax.block_until_ready(st)
                return st

            def timed(n, reps=5):
                ts = []
                for _ in range(reps + 1):
                    st = fresh()
                    t0 = time.perf_counter()
                    st, _ = eng.generate_steps(st, n)
                    jax.block_until_ready(st)
                    ts.append(time.perf_counter() - t0)
                    del st
                return statistics.median(ts[1:]) * 1e3

            row = {"variant": a.name, "model": model, "prompt": P, "weights": wq, "small_m": (str(eng.fuse_decode) if eng.fuse_decode else "on") if eng.small_m else "off", "batch": a.batch,
                   "sl": sl_name, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            t64, t16 = timed(64), timed(16)
            row["step_ms"] = round((t64 - t16) / 48, 4)
            # 16 and 31 steps are each one static loop (Engine.static_first_chunk): a step without the while
            # loop's host round trips, which step_ms includes (3-4 of them over its 48 steps)
            row["static_step_ms"] = round((timed(31) - t16) / 15, 4)
            for mode in [m for m in a.modes.split(",") if m]:
                eng.steps_mode = mode
                for n in (1, 7, 15):
                    row[f"{mode}_{n}_ms"] = round(timed(n), 3)
            print("ROW " + json.dumps(row), flush=True)
            llm = eng = params = None
            apply_sets(restore)


# --weights / --quantize names of the int8 layouts -> Engine.int8_layout ("int8": the engine's choice)
INT8_LAYOUTS = {"int8kn": "kn", "int8t": "nk"}


def _value(val: str):
    if val in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[val]
    for conv in (int, float):
        try:
            return conv(val)
        except ValueError:
            pass
    if val.startswith(("DecodeConfig(", "SmallLinearConfig(", "LayerConfig(")):    # a kernel config object
        from ftjax.pallas.decode_attention import DecodeConfig
        from ftjax.pallas.decode_layer import LayerConfig
        from ftjax.pallas.small_linear import SmallLinearConfig
        return eval(val, {"__builtins__": {}}, {"DecodeConfig": DecodeConfig, "SmallLinearConfig": SmallLinearConfig,
                                                "LayerConfig": LayerConfig})
    return val


def layer_kwargs(v: str) -> dict:
    """'field=value,field=value' (a --layer variant of bench/layer_trace.py / layer_sass.py) -> LayerConfig
    keyword arguments."""
    return {k: _value(val) for k, _, val in (item.partition("=") for item in v.split(",") if item)}


def parse_sl(v: str):
    """'name=field:value;field:value;@module.attr:value' -> (name, SmallLinearConfig, [(module, attr,
    value)]): SmallLinearConfig fields, and module globals set for that variant (values int, float, bool,
    None or str)."""
    from ftjax.pallas.small_linear import SmallLinearConfig

    name, _, spec = v.partition("=")
    kw, sets = {}, []
    for item in [i for i in spec.split(";") if i]:
        k, _, val = item.partition(":")
        if k.startswith("@"):
            mod, _, attr = k[1:].rpartition(".")
            sets.append((mod, attr, _value(val)))
        else:
            kw[k] = _value(val)
    return name, SmallLinearConfig(**kw), sets


def apply_set_args(items):
    """Set module globals from '--set module.attr:value ...' items (the '@' items of --sl, '@' left off)."""
    return apply_sets(parse_sl("set=" + ";".join("@" + v for v in items))[2])


def apply_sets(sets):
    """Set module globals; returns the previous values (to restore with apply_sets(old))."""
    import importlib

    old = []
    for mod, attr, val in sets:
        m = importlib.import_module(mod)
        assert hasattr(m, attr), f"--sl: {mod} has no {attr}"
        old.append((mod, attr, getattr(m, attr)))
        setattr(m, attr, val)
    if sets:   # a global read when a kernel is traced (e.g. ftjax.pallas._common.PDL): no stale jit cache
        import jax
        jax.clear_caches()
    return old


def run_child(script: str, name: str, flags: str, argv, on_row=None) -> list[dict]:
    """Run `script --child --name NAME *argv` with XLA_FLAGS += flags (XLA reads them when jax starts, so a
    variant is a process); its 'ROW {json}' lines, each handed to on_row as it comes (default: printed; a run cut
    by a timeout keeps what it has), its 'FAILED' lines echoed, and its stderr tail when it fails. stderr goes
    to a file, not a pipe: a child that logs more than a pipe holds would otherwise block."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    got = []
    with tempfile.TemporaryFile("w+") as errf:
        with subprocess.Popen([sys.executable, script, "--child", "--name", name, *argv], env=env,
                              stdout=subprocess.PIPE, stderr=errf, text=True) as p:
            for line in p.stdout:
                if line.startswith("ROW "):
                    got.append(json.loads(line[4:]))
                    (on_row or (lambda r: print(json.dumps(r), flush=True)))(got[-1])
                elif "FAILED" in line:
                    print(line.rstrip(), flush=True)
        if p.returncode or not got:
            errf.seek(0)
            err = "\n".join(ln for ln in errf.read().splitlines() if "Warning" not in ln)
            print(f"variant {name}: rc {p.returncode}, {len(got)} rows\n{err[-3000:]}", flush=True)
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="350m,1.3b")
    ap.add_argument("--weights", default="bf16", help="comma list of bf16, int8 (the engine's layout), int8e (mode "
                    "int8-embed: the token embedding / tied head int8 too), int8kn "
                    "(QuantizedWeight, [K, N]), int8t (QuantizedWeightT, [N, K]: the small-M kernel reads its tiles along K)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (0: 128, tiny models S/4); the steps "
                    "timed attend to prompt + up to 64 tokens of a 512-token cache")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--small-m", default="auto", help="comma list of auto/off/on/fused: the Pallas small-M projections "
                    "(on: reduced by XLA; fused: partials handed to the add+norm and attention kernels; or a fuse "
                    "mode of ftjax.layers.linear.small_m_kernel: stats, norm, stats2)")
    ap.add_argument("--modes", default="exact", help="engine step-count modes to time short calls in")
    ap.add_argument("--variants", nargs="*", default=["default="], help="name=XLA_FLAGS")
    ap.add_argument("--sl", nargs="*", default=["default="],
                    help="small-M kernel configs, each 'name=field:value;field:value' (SmallLinearConfig fields, "
                         "e.g. 'asm=dequant:asm' 'bn128=block_n:128;block_k:64'), and module globals as '@module.attr:value' "
                         "(a switch read when the step is traced), A/B in one process")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--name", default="default")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a)
    rows = []
    for v in a.variants:
        name, _, flags = v.partition("=")
        rows += run_child(__file__, name, flags, [
            "--models", a.models, "--weights", a.weights, "--batch", str(a.batch), "--prompt", str(a.prompt),
            "--attention", a.attention, "--modes", a.modes, "--small-m", a.small_m, "--sl", *a.sl])
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    keys = [k for k in (rows[0] if rows else {}) if k.endswith("_ms")]
    print("| variant | model | prompt | weights | small_m | sl | batch | " + " | ".join(keys) + " |")
    for r in rows:
        print(f"| {r['variant']} | {r['model']} | {r.get('prompt', '')} | {r['weights']} | {r['small_m']} | "
              f"{r.get('sl', '')} | {r['batch']} | "
              + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
