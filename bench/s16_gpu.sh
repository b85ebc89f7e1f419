#!/usr/bin/env bash
# Sixteenth session, one device call, as run on tree cd2566e (whose defaults were: the prefill norm kernel on at
# every size, SMALL_GRID_PROGRAMS 264, the 16-row limits): the prefill A/B (four variants) and the batch-64
# decode-step A/B (bench/b64_gpu.sh, the 1.3B parts). Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
NN="set:ftjax.models.gpt.NORM_KERNEL=false"
NG="set:ftjax.pallas.prefill_attention.SMALL_GRID_PROGRAMS=0"
timeout 180 python bench/request_ab.py --model 1.3b --weights bf16 --cases 1-512-32,1-128-8,64-128-8 --reps 5 \
  --variants "new=exact,old=exact;$NN;$NG,nonorm=exact;$NN,nogrid=exact;$NG" \
  --json "$OUT/norm.jsonl" 2>&1 | grep -v Warning
K64="@ftjax.layers.linear.SMALL_M_ROWS:64"
F64="@ftjax.layers.linear.FUSED_ROWS:64"
timeout 165 python bench/step_ab.py --models 1.3b --weights bf16 --batch 64 --small-m fused --modes "" \
  --sl default= "nonorm=@ftjax.models.gpt.NORM_KERNEL:False" "k64f=$K64;$F64" \
  --json "$OUT/b64_13b_bf16.jsonl" 2>&1 | grep -v Warning | tail -6
[ -n "$INT8" ] && timeout 130 python bench/step_ab.py --models 1.3b --weights int8 --batch 64 --small-m fused --modes "" \
  --sl default= "f64=$F64" --json "$OUT/b64_13b_int8.jsonl" 2>&1 | grep -v Warning | tail -4
