#!/usr/bin/env bash
# Sixteenth session: the batch-64 decode step on the fused path (the small-M kernel and the fused path up to 64
# rows, the defaults since f42d4fc) against the earlier 16-row limits (float projections of 17..64 rows on XLA's
# GEMMs, int8 on the kernel unfused). The session's own runs (tree cd2566e, whose defaults were the 16-row limits)
# are bench/s16_gpu.sh and bench/RESULTS.md. Results land in $OUT (or ./out).
#   bash bench/b64_gpu.sh
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R16="@ftjax.layers.linear.SMALL_M_ROWS:16;@ftjax.layers.linear.FUSED_ROWS:16"
for m in 1.3b 350m; do
  for w in bf16 int8; do
    timeout 140 python bench/step_ab.py --models $m --weights $w --batch 64 --small-m fused --modes "" \
      --sl default= "rows16=$R16" default2= --json "$OUT/b64_${m}_$w.jsonl" 2>&1 | grep "^|"
  done
done
