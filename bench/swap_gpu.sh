#!/usr/bin/env bash
# The small-M projection with W as the left operand of its product (SmallLinearConfig.swap_ab: a [block_n, 16]
# accumulator, 64-row tiles that compile to Hopper's wgmma instead of 16-row mma.sync), fifteenth session:
#   bash bench/swap_gpu.sh ab   # GPU check, then the decode step A/B (ABAB, one process per model), 1.3B and
#                               # 350M, bf16 and int8; kernel sequences of 1.3B bf16 both ways. Since the
#                               # decision swap_ab=None (swapped for bf16) is the default, so the A/B is now
#                               # default against swap_ab=False (the int8 rows then compare equal kernels)
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
case "${1:-ab}" in
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 90 python tests/gpu/check_variants.py --swap 2>&1 | tail -12
    timeout 330 python bench/step_ab.py --models 1.3b,350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "nosw=swap_ab:False" default2= "nosw2=swap_ab:False" --json "$OUT/swap_ab.jsonl" 2>&1 | tail -20
    timeout 80 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq_default.txt" 2>&1 | tail -14
    timeout 80 python bench/profile_decode.py --model 1.3b --steps 32 --set "ftjax.pallas.small_linear.DEFAULT_CONFIG:SmallLinearConfig(swap_ab=False)" \
      --sequence "$OUT/seq_noswap.txt" 2>&1 | tail -14
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
