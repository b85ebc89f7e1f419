#!/usr/bin/env bash
# Projections that finish their own split-K partials (ftjax.layers.linear.PROJ_EPILOGUE) on the GPU, one part
# per device call:
#   bash bench/epilogue_gpu.sh check   # the 1.3B bf16 decode step A/B (default, epilogues, PDL trigger first
#                                      # alone; default and epilogues twice), then tests/gpu/check_epilogue.py
#   bash bench/epilogue_gpu.sh int8    # the same A/B for 1.3B int8 and 350M bf16 / int8
#   bash bench/epilogue_gpu.sh profile # a 1.3B bf16 step kernel by kernel, default and with the epilogues
# Results land in $OUT (or ./out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
EPI=@ftjax.layers.linear.PROJ_EPILOGUE:True
TF=@ftjax.pallas._common.PDL_TRIGGER_FIRST:True
case "${1:-check}" in
  check)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 330 python bench/step_ab.py --models 1.3b --weights bf16 --small-m stats --modes "" \
      --sl default= "epi=$EPI" "tf=$TF" default2= "epi2=$EPI" --json "$OUT/epi_ab.jsonl" 2>&1 | tail -10
    timeout 200 python tests/gpu/check_epilogue.py 2>&1 | tail -20
    ;;
  int8)
    timeout 280 python bench/step_ab.py --models 1.3b --weights int8 --small-m stats --modes "" \
      --sl default= "epi=$EPI" "tf=$TF" default2= "epi2=$EPI" --json "$OUT/epi_ab_int8.jsonl" 2>&1 | tail -10
    timeout 280 python bench/step_ab.py --models 350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "epi=$EPI" default2= "epi2=$EPI" --json "$OUT/epi_ab_350.jsonl" 2>&1 | tail -10
    ;;
  profile) # the default step and the epilogue step, kernel by kernel (the sequence files: ~2 steps each)
    timeout 200 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq_default.txt" 2>&1 | tail -25
    timeout 200 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq_epi.txt" --set \
      ftjax.layers.linear.PROJ_EPILOGUE:True 2>&1 | tail -25
    ;;
esac
