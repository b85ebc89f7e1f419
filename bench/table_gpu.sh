#!/usr/bin/env bash
# Issue 9's table, in parts that each fit one device call (~8 minutes; HF eager and static beside ftjax in the
# same process). Results land in $OUT (or ./out): e2e's JSON lines and markdown table per part.
#   bash bench/table_gpu.sh b64    # 350M and 1.3B, batch 64, 128/8 and 512/32
#   bash bench/table_gpu.sh b1     # 350M and 1.3B, batch 1, 128/8 and 512/32; 6.7B b1 512/32
#   bash bench/table_gpu.sh 350m   # the four 350M rows (batch 1 and 64), in about half a call
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
case "${1:-b64}" in
  b64) CASES=350m-b64-128-8,350m-b64-512-32,1.3b-b64-128-8,1.3b-b64-512-32; BUDGET=470 ;;
  b1) CASES=350m-b1-128-8,350m-b1-512-32,1.3b-b1-128-8,1.3b-b1-512-32,6.7b-b1-512-32; BUDGET=450 ;;
  350m) CASES=350m-b1-128-8,350m-b1-512-32,350m-b64-128-8,350m-b64-512-32; BUDGET=${BUDGET:-300} ;;
  *) echo "unknown part $1 (b64 | b1 | 350m)"; exit 2 ;;
esac
timeout ${TIMEOUT:-585} python bench/e2e.py --cases "$CASES" --budget $BUDGET --out "$OUT/$1" 2>&1 | grep -v Warning | tail -40
