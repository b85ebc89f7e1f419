#!/usr/bin/env bash
# Eighteenth session: the int8 batch-64 prefill (1.3B) — XLA's Triton GEMMs with the int8 -> bf16 conversion
# in their tiles (default) against the weights dequantised by a kernel of their own before a plain bf16 GEMM
# (ftjax.layers.linear.INT8_DEQUANT_ROWS), with cuBLAS allowed in the admit call or not; bf16 beside; then the
# small-M projection kernel at 64 rows (the batch-64 decode step), int8 and bf16, with a tile sweep of the
# int8 calls (int8t: stored [N, K], the engine's layout). Results land in $OUT (or ./out).
#   bash bench/int8_prefill_gpu.sh [all | ab | bf16 | sl64 | ab3 | step64]     # all: the first three parts in turn
# ab3: the ab part at 512/32 alone, three A/B pairs (nineteenth session). step64: the 1.3B batch-64 decode step
# (step_ab, prompt 384) with int8 weights over small-M configs for the normalising projections, bf16 beside
# (old264: the int8 64-row calls' program target before the nineteenth session; that session ran 'wp528', the
# default since). Twentieth session: INT8_DEQUANT_ROWS = 4096 is the default now, so 'triton' sets it to none; the
# A/B parts run a process per variant (request_ab --isolate: in one process the variants interfered).
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TRI="exact;set:ftjax.layers.linear.INT8_DEQUANT_ROWS=none"   # the Triton GEMMs (the default before the twentieth session)
PART=${1:-all}
[ "$PART" = all ] || [ "$PART" = ab ] && timeout 330 python bench/request_ab.py --isolate --model 1.3b --weights int8 --cases 64-512-32,64-128-8 --reps ${REPS:-5} \
  --variants "triton=$TRI,deqcub=exact,triton2=$TRI,deqcub2=exact" \
  --json "$OUT/int8_prefill.jsonl" 2>&1 | grep -v Warning
[ "$PART" = all ] || [ "$PART" = bf16 ] && timeout 60 python bench/request_ab.py --model 1.3b --weights bf16 --cases 64-128-8,64-512-32 --reps 5 \
  --variants "exact,exact2=exact" --json "$OUT/bf16.jsonl" 2>&1 | grep -v Warning
[ "$PART" = all ] || [ "$PART" = sl64 ] && timeout 100 python bench/small_linear.py --parts main,sweep --models gpt1.3b --ms 64 --dtypes bf16,int8t \
  --sweep gpt1.3b:fc1:64:int8t,gpt1.3b:qkv:64:int8t,gpt1.3b:fc2:64:int8t,gpt1.3b:o:64:int8t --sweep-budget 50 \
  --json "$OUT/small_linear64.json" 2>&1 | grep -v Warning | tail -30
[ "$PART" = ab3 ] && timeout 400 python bench/request_ab.py --isolate --model 1.3b --weights int8 --cases 64-512-32 --reps ${REPS:-7} \
  --variants "triton=$TRI,deqcub=exact,triton2=$TRI,deqcub2=exact,triton3=$TRI,deqcub3=exact" \
  --json "$OUT/int8_prefill3.jsonl" 2>&1 | grep -v Warning
[ "$PART" = step64 ] && { timeout 330 python bench/step_ab.py --models 1.3b --weights int8 --batch 64 --prompt 384 --modes "" \
  --sl "default=" "old264=target_programs:264" "s4=num_splits:4" "w8=num_warps:8" "w8s4=num_warps:8;num_splits:4" \
  --json "$OUT/step64_int8.jsonl" 2>&1 | grep -v Warning;
  timeout 80 python bench/step_ab.py --models 1.3b --weights bf16 --batch 64 --prompt 384 --modes "" \
  --json "$OUT/step64_bf16.jsonl" 2>&1 | grep -v Warning; }
