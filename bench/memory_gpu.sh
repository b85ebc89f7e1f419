#!/usr/bin/env bash
# Device memory a 6.7B int8 batch-64 512/32 request takes beyond the engine's own arrays, the dequantised
# prefill (linear.INT8_DEQUANT_ROWS, the default) against XLA's Triton GEMMs converting int8 in their tiles
# (twenty-first session):
#   bash bench/memory_gpu.sh
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for s in "" "ftjax.layers.linear.INT8_DEQUANT_ROWS:None"; do
  timeout 250 python bench/admit_memory.py --case 6.7b-64-512-32 --weights int8 ${s:+--set $s} \
    --json "$OUT/admit_memory.jsonl" 2>&1 | tail -4
done
