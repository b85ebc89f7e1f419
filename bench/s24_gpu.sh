#!/usr/bin/env bash
# Twenty-fourth session's device parts. Results land in $OUT (or ./out). attn13 and sl64 ran in that session
# (bench/RESULTS.md: nothing kept); `packed` is ready for the next one (the device time ran out before it).
#   bash bench/s24_gpu.sh attn13  # the append attention at head_dim 128 (GPT 1.3B), batch 64 and 1 (BATCHES=...): 8 warps,
#                                 # block_k 32, 2 and 3 stages against the default (4 warps, block_k 64)
#   bash bench/s24_gpu.sh sl64    # the 64-row projections' launch: 8 and 2 warps, 2 and 4 stages (350M and 1.3B batch
#                                 # 64; MODELS=...)
#   bash bench/s24_gpu.sh packed  # the prefill's packed q/k/v (attention.PACKED_QKV, off by default) against the three
#                                 # projections as written (XLA's dot merger joins them, concatenating the weights, and
#                                 # three bias adds split the product) and against the dot merger off for the admit
#                                 # (three GEMMs, bias in each epilogue, nothing to split), whole batch-64 requests, a
#                                 # process per variant: 350M, then 1.3B (MODELS=..., CASES=...; ~3-4 minutes a model)
#   bash bench/s24_gpu.sh admit1  # batch-1 requests (1.3B, then 350M), where the admit's ~450-node CUDA graph takes ~3 ms
#                                 # of host launch: packed q/k/v (3 fewer nodes a layer), and "all": with it the add +
#                                 # norm kernel at every prefill size (gpt.NORM_KERNEL_MIN_ROWS=1: 4 fewer a layer) and
#                                 # the state fields written by selects (engine.INSERT_SELECT: ~40 scatters fewer)
#   (gelu: the prefill's MLP-in as a Pallas GEMM with bias + GELU in its epilogue, removed in the twenty-fifth
#   session after its kernel measured 6-8% slower than cuBLAS + the GELU pass)
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A="@ftjax.pallas.decode_attention.APPEND_CONFIG"
D="block_k=64,min_blocks_per_split=1,small_head_warps=2"
DEADLINE=${DEADLINE:-570}
case "${1:-attn13}" in
  attn13)
    for b in ${BATCHES:-64 1}; do
      timeout $(lim 260) python bench/step_ab.py --models 1.3b --weights bf16 --batch $b --small-m fused --modes "" \
        --sl default= "w8=$A:DecodeConfig($D,num_warps=8)" "bk32=$A:DecodeConfig(${D/block_k=64/block_k=32})" \
        "st2=$A:DecodeConfig($D,num_stages=2)" "st3=$A:DecodeConfig($D,num_stages=3)" default2= \
        --json "$OUT/attn13_b$b.jsonl" 2>&1 | grep "^| \|Error"
    done
    ;;
  sl64)
    for m in ${MODELS:-350m 1.3b}; do
      timeout $(lim 260) python bench/step_ab.py --models $m --weights bf16 --batch 64 --small-m fused --modes "" \
        --sl default= "w8=num_warps:8" "w2=num_warps:2" "st2=num_stages:2" "st4=num_stages:4" default2= \
        --json "$OUT/sl64_$m.jsonl" 2>&1 | grep "^| \|Error"
    done
    ;;
  packed)
    P_ON="exact;set:ftjax.layers.attention.PACKED_QKV=true"
    NOMERGE="exact;admit:xla_disable_hlo_passes=dot-merger"
    for m in ${MODELS:-350m 1.3b}; do
      timeout $(lim 280) python bench/request_ab.py --isolate --model $m --weights bf16 --cases ${CASES:-64-128-8,64-512-32} \
        --reps 5 --variants "off=exact,on=$P_ON,nomerge=$NOMERGE,off2=exact,on2=$P_ON,nomerge2=$NOMERGE" \
        --json "$OUT/packed_$m.jsonl" 2>&1 | grep -v Warning
    done
    ;;
  admit1)
    P_ON="exact;set:ftjax.layers.attention.PACKED_QKV=true"
    P_ALL="$P_ON;set:ftjax.models.gpt.NORM_KERNEL_MIN_ROWS=1;set:ftjax.engine.INSERT_SELECT=true"
    for m in ${MODELS:-1.3b 350m}; do
      timeout $(lim 280) python bench/request_ab.py --isolate --model $m --weights bf16 --cases ${CASES:-1-128-8,1-512-32} \
        --reps 7 --variants "off=exact,on=$P_ON,all=$P_ALL,off2=exact,on2=$P_ON,all2=$P_ALL" \
        --json "$OUT/admit1_$m.jsonl" 2>&1 | grep -v Warning
    done
    ;;
  gelu)
    echo "removed: the GEMM + GELU kernel (mlp.GELU_GEMM) measured slower than cuBLAS + the GELU pass (bench/RESULTS.md, twenty-fifth session)"
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
