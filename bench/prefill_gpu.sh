#!/usr/bin/env bash
# Fifteenth session: where a 512-token prefill's time goes at 1.3B, bf16 against int8 (XLA's GEMMs; the int8
# weights' conversion), one device call. Results land in $OUT (or ./out).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for q in bf16 int8; do
  extra=""; [ "$q" = int8 ] && extra="--quantize int8"
  timeout 100 python bench/profile_decode.py --model 1.3b --prompt 512 --steps 4 $extra \
    --sequence "$OUT/pre512_$q.txt" 2>&1 | grep -v Warning | tail -22
done
