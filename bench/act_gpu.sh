#!/usr/bin/env bash
# The MLP output projection finishing the input projection itself (the activation prologue,
# `ftjax.layers.mlp.ACT_PROLOGUE`: no XLA bias + activation fusion between the two projections of the decode
# step), twenty-first session:
#   bash bench/act_gpu.sh ab    # GPU check, then the decode step A/B (ABAB, one process per model), 1.3B and
#                               # 350M, bf16 and int8, default (on) against off
#   bash bench/act_gpu.sh prof  # kernel sequences of the 1.3B bf16 step both ways
#   bash bench/act_gpu.sh mem   # device memory a 6.7B int8 batch-64 512/32 request takes beyond the engine's
#                               # arrays, the dequantised prefill (default) against XLA's Triton GEMMs
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
off="@ftjax.layers.mlp.ACT_PROLOGUE:False"
case "${1:-ab}" in
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 200 python tests/gpu/check_act_prologue.py 2>&1 | tail -16
    timeout 360 python bench/step_ab.py --models 1.3b,350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "off=$off" default2= "off2=$off" --json "$OUT/act_ab.jsonl" 2>&1 | tail -20
    ;;
  prof)
    timeout 90 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq_act.txt" 2>&1 | tail -14
    timeout 90 python bench/profile_decode.py --model 1.3b --steps 32 --set "ftjax.layers.mlp.ACT_PROLOGUE:False" \
      --sequence "$OUT/seq_noact.txt" 2>&1 | tail -14
    ;;
  mem)
    for s in "" "ftjax.layers.linear.INT8_DEQUANT_ROWS:None"; do
      timeout 200 python bench/admit_memory.py --case 6.7b-64-512-32 --weights int8 ${s:+--set $s} \
        --json "$OUT/admit_memory.jsonl" 2>&1 | tail -3
    done
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
