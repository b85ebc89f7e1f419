#!/usr/bin/env bash
# Sixteenth session: the batch-64 decode step with the small-M projection kernel at 17..64 rows for bf16 weights
# (a 64-row x tile is wgmma's left operand: bench/triton_sass.py --m 64), and the fused decode path
# (add + statistics kernel, normalising projections, the attention kernel that writes the new K/V) at 64 rows;
# and the plain path's residual add + norm as one kernel (gpt.NORM_KERNEL, the default) against XLA's norms.
# Results land in $OUT (or ./out).
#   bash bench/b64_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
K64="@ftjax.layers.linear.SMALL_M_ROWS:64"
F64="@ftjax.layers.linear.FUSED_ROWS:64"
timeout 300 python bench/step_ab.py --models 1.3b --weights bf16 --batch 64 --small-m fused --modes "" \
  --sl default= "nonorm=@ftjax.models.gpt.NORM_KERNEL:False" "k64=$K64" "k64f=$K64;$F64" \
  --json "$OUT/b64_13b_bf16.jsonl" 2>&1 | grep -v Warning | tail -8
timeout 150 python bench/step_ab.py --models 1.3b --weights int8 --batch 64 --small-m fused --modes "" \
  --sl default= "f64=$F64" "nonorm=@ftjax.models.gpt.NORM_KERNEL:False" --json "$OUT/b64_13b_int8.jsonl" 2>&1 | grep -v Warning | tail -4
timeout 120 python bench/step_ab.py --models 350m --weights bf16 --batch 64 --small-m fused --modes "" \
  --sl default= "k64=$K64" "k64f=$K64;$F64" --json "$OUT/b64_350m_bf16.jsonl" 2>&1 | grep -v Warning | tail -5
