#!/usr/bin/env bash
# The persistent layer kernel's first GPU runs (ftjax/pallas/decode_layer.py), each part time-bounded so a
# hang (a program of the grid that never became resident, a lost counter update) costs minutes, not the
# lease. One part per device call (each fits the 600 s command limit):
#   bash bench/layer_gpu.sh check   # correctness on the GPU: every shape against the float32 twin, repeats
#                                   # bitwise equal, counters left zeroed (tests/gpu/check_layer.py)
#   bash bench/layer_gpu.sh trace   # bench/layer_trace.py: time per layer and per-phase stamps of every program
#   bash bench/layer_gpu.sh ab      # decode step A/B in one process per model: the kernel-per-op fused step
#                                   # (stats) against the layer kernel, bf16 and int8, 350M / 1.3B
#   bash bench/layer_gpu.sh ab67    # the same at 6.7B
#   bash bench/layer_gpu.sh ab64    # the same at batch 64 (350M / 1.3B)
#   bash bench/layer_gpu.sh tune    # layer-kernel configs on 1.3B: L2 prefetch, stages, 2 programs/SM, spin sleep
#   bash bench/layer_gpu.sh tune2   # and: 4 warps, 32 KB tiles, deeper prefetch
#   bash bench/layer_gpu.sh e2e     # issue 9's batch-1 table with --fuse layer (HF side by side)
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
L=ftjax.pallas.decode_layer.DEFAULT_CONFIG
case "${1:-check}" in
  check)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    timeout 420 python tests/gpu/check_layer.py 2>&1 | tee "$OUT/check_layer.log"
    ;;
  trace)  # inside the kernel: per-phase time stamps of every program, and the time per layer
    timeout 560 python bench/layer_trace.py --models 1.3b,350m --weights bf16,int8t --out "$OUT" \
      --layer "" "prefetch_tiles=2" 2>&1 | tail -12
    ;;
  ab)
    timeout 560 python bench/step_ab.py --models 1.3b,350m --weights bf16,int8 --small-m stats,layer \
      --modes "" --json "$OUT/layer_ab.jsonl" 2>&1 | tail -20
    ;;
  ab67)
    timeout 560 python bench/step_ab.py --models 6.7b --weights bf16,int8 --small-m stats,layer \
      --modes "" --json "$OUT/layer_ab67.jsonl" 2>&1 | tail -20
    ;;
  ab64)   # batch 64: the layer kernel with 64-row tiles (x normalised once per norm: prenorm)
    timeout 560 python bench/step_ab.py --models 350m,1.3b --batch 64 --weights bf16,int8 --small-m stats,layer \
      --modes "" --json "$OUT/layer_ab64.jsonl" 2>&1 | tail -20
    ;;
  tune)   # each variant builds and compiles an engine (~30-40 s): two calls' worth
    timeout 560 python bench/step_ab.py --models 1.3b --weights bf16,int8 --small-m layer --modes "" \
      --sl default= "pf2=@$L:LayerConfig(prefetch_tiles=2)" "st4=@$L:LayerConfig(num_stages=4)" \
      "pps2=@$L:LayerConfig(programs_per_sm=2)" "sleep64=@$L:LayerConfig(spin_sleep_ns=64)" default2= \
      --json "$OUT/layer_tune.jsonl" 2>&1 | tail -20
    ;;
  tune2)
    timeout 560 python bench/step_ab.py --models 1.3b --weights bf16,int8 --small-m layer --modes "" \
      --sl default= "w4=@$L:LayerConfig(num_warps=4)" "t32k=@$L:LayerConfig(tile_bytes=32768)" \
      "pf4=@$L:LayerConfig(prefetch_tiles=4)" default2= --json "$OUT/layer_tune2.jsonl" 2>&1 | tail -20
    ;;
  e2e)
    timeout 560 python bench/e2e.py --fuse layer --cases 350m-b1-128-8,350m-b1-512-32,1.3b-b1-128-8,1.3b-b1-512-32,6.7b-b1-512-32 \
      --budget 500 --out "$OUT" 2>&1 | tail -30
    ;;
  *)
    echo "usage: $0 check|trace|ab|ab67|ab64|tune|tune2|e2e" >&2
    exit 2
    ;;
esac
