"""INT8 weight-only accuracy against bf16 on the benchmark shapes (issue 9: "top-1 agreement and KL against
bf16 logits on random prompts, recorded").

    PYTHONUNBUFFERED=1 python bench/int8_accuracy.py [--models 350m,1.3b] [--modes int8,int8-embed] [--prompts 8]
        [--len 128] [--out $OUT]

Per model: random bf16 weights (bench/e2e.py's `random_params`: N(0, 0.02), norms 1, biases 0), the same
weights quantised per output channel (`ftjax.quantize.quantize_params`, each of --modes: int8 the projections,
int8-embed the token embedding / tied head too), and next-token logits at every
position of random prompts from both engines (`ftjax.quantize.int8_accuracy`): top-1 agreement, mean and max
KL(p_bf16 || p_int8). Random weights give flat logits with many near-ties, so the report also gives the
median gap between bf16's two best logits and the top-1 agreement over positions whose gap is at least 0.05
(a disagreement there is a real flip, not a tie).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="350m,1.3b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="int8", help="comma list of ftjax.quantize modes (int8, int8-embed)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.common import device_info
    from bench.e2e import MODELS, SMOKE_MODELS, make_config, random_params
    from ftjax import quantize as Q

    models = {**MODELS, **SMOKE_MODELS}
    print(f"device: {device_info()}, jax {jax.__version__}", flush=True)
    rows = []
    for name in a.models.split(","):
        cfg = make_config(name, models)
        params = random_params(cfg, seed=a.seed)
        rng = np.random.RandomState(a.seed)
        prompts = rng.randint(1, cfg.vocab, size=(a.prompts, a.len)).tolist()
        kw = dict(dtype="bfloat16", max_batch_size=a.prompts, max_seq_len=a.len + 8, max_beam_width=1)
        fp = ftjax.LLM(cfg, params, **kw)
        lf = fp.logits(prompts).astype(np.float64)
        del fp
        top2 = np.sort(lf, axis=-1)[..., -2:]
        gap = (top2[..., 1] - top2[..., 0]).reshape(-1)
        clear = gap >= 0.05
        for mode in a.modes.split(","):
            q = ftjax.LLM(cfg, Q.quantize_params(params, cfg, mode=mode, scale_dtype=jax.numpy.bfloat16), **kw)
            lq = q.logits(prompts).astype(np.float64)
            rep = Q.int8_accuracy_from_logits(lf, lq, [len(p) for p in prompts])
            agree = (lf.argmax(-1) == lq.argmax(-1)).reshape(-1)
            row = {"model": name, "mode": mode, **rep,
                   "median_top2_gap": round(float(np.median(gap)), 4), "logit_std": round(float(lf.std()), 4),
                   "clear_positions": int(clear.sum()),
                   "top1_clear": round(float(agree[clear].mean()), 4) if clear.any() else None}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q
    print("\n| model | mode | positions | top-1 agreement | top-1 where bf16's gap >= 0.05 (positions) | mean KL | max KL "
          "| median top-2 gap | logit std |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['positions']} | {r['top1']:.4f} | {r['top1_clear']} ({r['clear_positions']}) "
              f"| {r['kl']:.2e} | {r['max_kl']:.2e} | {r['median_top2_gap']} | {r['logit_std']} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "int8_accuracy.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
