#!/usr/bin/env bash
# Twenty-second session. Results land in $OUT (or ./out).
#   bash bench/s22_gpu.sh first   # one device call: greedy tokens across cold processes with XLA's GEMM autotuning off and
# on (bench/prefill_gpu.sh det); the dot-merger A/B of the fifteenth session again with the pass's real name, a
# process per variant; where a 350M batch-1 decode step's time goes (kernel sequence with durations and gaps).
#   bash bench/s22_gpu.sh cache   # the same request in four cold processes that share one persistent compilation
#                                 # cache (the first compiles and autotunes, the others load its executables)
#   bash bench/s22_gpu.sh b64prof # a 350M batch-64 step's kernel sequence, prompts of 128 and 512 tokens
. "$(dirname "$0")/gpu_env.sh"
case "${1:-first}" in
  first)
bash bench/prefill_gpu.sh det
NOMERGE="exact;admit:xla_disable_hlo_passes=dot-merger"
timeout 170 python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-512-32 --reps 5 \
  --variants "exact,nomerge=$NOMERGE,exact2=exact,nomerge2=$NOMERGE" --json "$OUT/nomerge_iso.jsonl" 2>&1 | grep -v Warning
timeout 110 python bench/profile_decode.py --model 350m --steps 32 --sequence "$OUT/seq350.txt" 2>&1 \
  | grep -v Warning | tail -8
    ;;
  cache)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    CC=$(mktemp -d /tmp/ftjax_cc.XXXX)   # not under $OUT: the cache's files would be copied back
    timeout 200 python bench/request_ab.py --isolate --compile-cache "$CC" --model 1.3b --weights bf16 --cases 1-512-32 \
      --reps 2 --variants "c1=exact,c2=exact,c3=exact,c4=exact" --json "$OUT/det_cache.jsonl" 2>&1 | grep -v Warning
    ;;
  b64prof)
    # where a 350M batch-64 step's time goes (128- and 512-token prompts): kernel sequences for bench/step_shares.py
    for t in 128 512; do
      timeout 120 python bench/profile_decode.py --model 350m --batch 64 --prompt $t --steps 16 \
        --sequence "$OUT/seq350_b64_$t.txt" 2>&1 | grep -v Warning | tail -4
    done
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
