#!/usr/bin/env bash
# Twenty-second session, one device call: greedy tokens across cold processes with XLA's GEMM autotuning off and
# on (bench/prefill_gpu.sh det); the dot-merger A/B of the fifteenth session again with the pass's real name, a
# process per variant; where a 350M batch-1 decode step's time goes (kernel sequence with durations and gaps).
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
bash bench/prefill_gpu.sh det
NOMERGE="exact;admit:xla_disable_hlo_passes=dot-merger"
timeout 170 python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-512-32 --reps 5 \
  --variants "exact,nomerge=$NOMERGE,exact2=exact,nomerge2=$NOMERGE" --json "$OUT/nomerge_iso.jsonl" 2>&1 | grep -v Warning
timeout 110 python bench/profile_decode.py --model 350m --steps 32 --sequence "$OUT/seq350.txt" 2>&1 \
  | grep -v Warning | tail -8
