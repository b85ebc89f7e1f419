#!/usr/bin/env bash
# L2 prefetch of the weights across kernel boundaries (ftjax.pallas._common.l2_prefetch) and the tied head through
# the small-M kernel (ftjax.layers.embed.HEAD_SMALL_M), one part per device call:
#   bash bench/prefetch_gpu.sh ab      # tokens bitwise unchanged with every prefetch on; decode step A/B, 1.3B bf16:
#                                      # each alone, all of them, all with the early trigger; a profile of the step
#   bash bench/prefetch_gpu.sh ab2     # the same A/B, 1.3B int8 and 350M bf16 / int8
# Results land in $OUT (or ./out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
ALL_MB=${ALL_MB:-67108864}
SL=ftjax.pallas.small_linear
PF2="prefetch_blocks:2"                                     # each projection: its first 2 W tiles, before the wait
NX="next_bytes:$ALL_MB"                                     # o -> MLP in -> MLP out -> next q/k/v: when done
ATT="@ftjax.pallas.decode_attention.PREFETCH_BYTES:$ALL_MB" # the attention kernel: the o projection's weight
TF="@ftjax.pallas._common.PDL_TRIGGER_FIRST:True"           # dependents launched before the wait
HEAD="@ftjax.layers.embed.HEAD_SMALL_M:True"                # the tied head through the small-M kernel
VARIANTS=(default= "pf2=$PF2" "att=$ATT" "nx=$NX" "head=$HEAD" "all=$PF2;$NX;$ATT;$HEAD"
          "all_tf=$PF2;$NX;$ATT;$HEAD;$TF" default2=)
case "${1:-ab}" in
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 130 python tests/gpu/check_pdl.py --on \
      "$SL.DEFAULT_CONFIG:SmallLinearConfig(prefetch_blocks=2,next_bytes=$ALL_MB)" \
      "ftjax.pallas.decode_attention.PREFETCH_BYTES:$ALL_MB" "ftjax.pallas._common.PDL_TRIGGER_FIRST:True" \
      2>&1 | tail -10
    timeout 300 python bench/step_ab.py --models 1.3b --weights bf16 --small-m stats --modes "" \
      --sl "${VARIANTS[@]}" --json "$OUT/prefetch_ab.jsonl" 2>&1 | tail -12
    timeout 100 python bench/profile_decode.py --model 1.3b --steps 32 --sequence "$OUT/seq13.txt" 2>&1 | tail -30
    ;;
  ab2)
    timeout 300 python bench/step_ab.py --models 1.3b --weights int8 --small-m stats --modes "" \
      --sl "${VARIANTS[@]}" --json "$OUT/prefetch_ab_int8.jsonl" 2>&1 | tail -12
    timeout 280 python bench/step_ab.py --models 350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "all=$PF2;$NX;$ATT;$HEAD" "all_tf=$PF2;$NX;$ATT;$HEAD;$TF" "head=$HEAD" default2= \
      --json "$OUT/prefetch_ab350.jsonl" 2>&1 | tail -14
    ;;
esac
