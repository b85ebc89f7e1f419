#!/usr/bin/env bash
# Ready for the next session (written in the twenty-second, not yet run). Results land in $OUT (or ./out).
#   bash bench/s23_gpu.sh b64     # the 64 x 64 tile rule (SmallLinearConfig.wide_min_programs) against the old tiles,
#                                 # ABAB, batch-64 steps of 350M (measured once as an explicit config) and 1.3B (only
#                                 # its o projection changes; not measured yet)
#   bash bench/s23_gpu.sh tiles64 # smaller tiles still at 350M batch 64 (more programs: 32 x 64, 64 x 32, 32 x 32)
#   bash bench/s23_gpu.sh attn64  # the append attention's config at batch 64 (1,024 programs of 2-9 key blocks each:
#                                 # 62% of copy bandwidth at 136 keys), 350M, prompts 128 and 400
#   bash bench/s23_gpu.sh admit   # the 1.3B bf16 admit without cuBLAS, or with its GEMMs outside the CUDA graph
#   bash bench/s23_gpu.sh all     # b64, then attn64 at prompt 128, tiles64, attn64 at 400, each cut to what is
#                                 # left of a 570 s call (DEADLINE)
#   bash bench/table_gpu.sh b64   # then the batch-64 rows of the table again
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OLD="old=wide_min_programs:None"
A="@ftjax.pallas.decode_attention.APPEND_CONFIG"
if [ "${1:-}" = all ]; then
  export DEADLINE=$((SECONDS + 570)) PROMPTS=128
  for p in b64 attn64 tiles64; do [ $((DEADLINE - SECONDS)) -gt 60 ] && DEADLINE=$((DEADLINE - SECONDS)) bash "$0" $p; done
  [ $((DEADLINE - SECONDS)) -gt 100 ] && DEADLINE=$((DEADLINE - SECONDS)) PROMPTS=400 bash "$0" attn64
  exit 0
fi
case "${1:-b64}" in
  b64)
    for m in 350m 1.3b; do
      timeout $(lim 140) python bench/step_ab.py --models $m --weights bf16 --batch 64 --small-m fused --modes "" \
        --sl default= "$OLD" default2= "${OLD/old=/old2=}" --json "$OUT/tiles64_$m.jsonl" 2>&1 | grep -v Warning | tail -5
    done
    ;;
  tiles64)
    timeout $(lim 200) python bench/step_ab.py --models 350m --weights bf16 --batch 64 --small-m fused --modes "" \
      --sl default= "bn32k64=block_n:32;block_k:64" "bn64k32=block_n:64;block_k:32" "bn32k32=block_n:32;block_k:32" \
      default2= --json "$OUT/tiles64_small.jsonl" 2>&1 | grep -v Warning | tail -6
    ;;
  attn64)
    for t in ${PROMPTS:-128 400}; do   # step_ab: a 64-step call must fit the 512-token cache
      timeout $(lim 200) python bench/step_ab.py --models 350m --weights bf16 --batch 64 --prompt $t --small-m fused --modes "" \
        --sl default= "bk128=$A:DecodeConfig(block_k=128,min_blocks_per_split=1)" \
        "st3=$A:DecodeConfig(block_k=64,min_blocks_per_split=1,num_stages=3)" \
        "w2=$A:DecodeConfig(block_k=64,min_blocks_per_split=1,num_warps=2)" \
        "w8=$A:DecodeConfig(block_k=64,min_blocks_per_split=1,num_warps=8)" \
        "sp2=$A:DecodeConfig(block_k=64,num_splits=2)" default2= \
        --json "$OUT/attn64_$t.jsonl" 2>&1 | grep -v Warning | tail -7
    done
    ;;
  admit)
    # is the admit's ~2.4 ms graph launch (5 us a node, against 1.7 for the decode step's graph) the cuBLAS GEMMs'
    # traced child graphs? The bf16 admit with every GEMM on XLA's Triton emitter (no cuBLAS), and with the GEMMs
    # launched outside the graph, against the default, each in its own process
    timeout $(lim 300) python bench/request_ab.py --model 1.3b --cases 1-128-8,1-512-32 --reps 7 --isolate \
      --variants "exact,nofb=exact;admit:xla_gpu_cublas_fallback=false,blas_out=exact;admit:xla_gpu_enable_command_buffer=FUSION+CUSTOM_CALL+CUDNN+DYNAMIC_SLICE_FUSION,exact2=exact" \
      --json "$OUT/admit_cb.jsonl" 2>&1 | grep -v Warning | tail -14
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
