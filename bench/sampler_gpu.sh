#!/usr/bin/env bash
# The decode step's sampler and bookkeeping on the GPU (fourteenth session), one part per device call:
#   bash bench/sampler_gpu.sh ab   # processors compiled in only when a live slot needs them (the default)
#                                  # against always (ftjax.engine.ALWAYS_PENALIZE), 1.3B and 350M, bf16 and
#                                  # int8; then a kernel sequence of the 1.3B step both ways
#   bash bench/sampler_gpu.sh all  # one call: the loop A/B as whole requests, the step of bf16, int8 and
#                                  # int8-embed weights, and the int8 / int8-embed accuracy against bf16
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
PEN=@ftjax.engine.ALWAYS_PENALIZE:True
case "${1:-ab}" in
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 300 python bench/step_ab.py --models 1.3b,350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "always=$PEN" default2= --json "$OUT/pen_ab.jsonl" 2>&1 | tail -16
    timeout 90 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq_default.txt" 2>&1 | tail -25
    timeout 90 python bench/profile_decode.py --model 1.3b --steps 32 --set ftjax.engine.ALWAYS_PENALIZE:True \
      --sequence "$OUT/seq_always.txt" 2>&1 | tail -8
    ;;
  all)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    OLD="old=exact;engine:static_first_chunk=false"
    timeout 110 python bench/request_ab.py --model 1.3b --cases 1-512-32,1-128-64 \
      --variants "exact,$OLD" --reps 9 --json "$OUT/all_loop_13b.jsonl" 2>&1 | tail -6
    timeout 150 python bench/step_ab.py --models 1.3b --weights bf16,int8,int8e --small-m stats --modes "" \
      --json "$OUT/all_step.jsonl" 2>&1 | tail -5
    timeout 50 python bench/request_ab.py --model 350m --cases 1-512-32 \
      --variants "exact,$OLD" --reps 9 --json "$OUT/all_loop_350m.jsonl" 2>&1 | tail -4
    timeout 120 python bench/int8_accuracy.py --models 350m,1.3b --modes int8,int8-embed --out "$OUT" 2>&1 | tail -7
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
