#!/usr/bin/env bash
# L2 prefetch of the weights across kernel boundaries (ftjax.pallas._common.l2_prefetch), one part per device call:
#   bash bench/prefetch_gpu.sh ab      # the decoded tokens bitwise unchanged with every prefetch on; decode step A/B,
#                                      # 1.3B bf16 and int8: each prefetch alone, all of them, all with the early trigger
#   bash bench/prefetch_gpu.sh ab350   # the same A/B at 350M (batch 1), and 1.3B batch 16
# Results land in $OUT (or ./out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
ALL_MB=${ALL_MB:-67108864}
SL=ftjax.pallas.small_linear
PF2="prefetch_blocks:2"                                     # each projection: its first 2 W tiles, before the wait
NX="next_bytes:$ALL_MB"                                     # MLP in: the MLP out weight, when its programs are done
ATT="@ftjax.pallas.decode_attention.PREFETCH_BYTES:$ALL_MB" # the attention kernel: the o projection's weight
TF="@ftjax.pallas._common.PDL_TRIGGER_FIRST:True"           # dependents launched before the wait
case "${1:-ab}" in
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 150 python tests/gpu/check_pdl.py --on \
      "$SL.DEFAULT_CONFIG:SmallLinearConfig(prefetch_blocks=2,next_bytes=$ALL_MB)" \
      "ftjax.pallas.decode_attention.PREFETCH_BYTES:$ALL_MB" "ftjax.pallas._common.PDL_TRIGGER_FIRST:True" \
      2>&1 | tail -10
    timeout 420 python bench/step_ab.py --models 1.3b --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "pf2=$PF2" "att=$ATT" "nx=$NX" "all=$PF2;$NX;$ATT" "all_tf=$PF2;$NX;$ATT;$TF" default2= \
      --json "$OUT/prefetch_ab.jsonl" 2>&1 | tail -16
    ;;
  ab350)
    timeout 300 python bench/step_ab.py --models 350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "pf2=$PF2" "att=$ATT" "nx=$NX" "all=$PF2;$NX;$ATT" "all_tf=$PF2;$NX;$ATT;$TF" default2= \
      --json "$OUT/prefetch_ab350.jsonl" 2>&1 | tail -16
    ;;
esac
