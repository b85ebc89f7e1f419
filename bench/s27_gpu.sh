#!/usr/bin/env bash
# Twenty-seventh session's device parts (for the next session). Results land in $OUT (or ./out).
#   bash bench/s27_gpu.sh table      # the e2e rows whose defaults changed (packed q/k/v params, PACKED_QKV on):
#                                    # 1.3B batch 1 and 350M batch 64, ftjax bf16 / int8 beside HF eager and static
#   bash bench/s27_gpu.sh launchdiff # why the 1.3B admit's graph takes 1.2 ms longer to launch than the 350M one's
#                                    # with the same 406 kernels: each admit's command buffers and the ops between
#                                    # them (bench/admit_hlo.py), then one traced request each, the host's XLA
#                                    # runtime events (Execute, command-buffer update, cuGraphLaunch) at depth 8
#   bash bench/s27_gpu.sh kvwrite    # the prefill writing the K/V into the cache itself (engine.PREFILL_WRITES_KV, off):
#                                    # the admit's kernels and GPU time (a process each), then whole requests a
#                                    # process per variant, 1.3B batch 1 and 350M batch 64 (about 6 minutes)
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DEADLINE=${DEADLINE:-570}
for part in "${@:-table}"; do
case "$part" in
  table)
    # e2e's --budget ends the run cleanly (its rows so far printed); the timeout is the backstop
    timeout $(( DEADLINE - SECONDS - 10 )) python bench/e2e.py --budget $(( DEADLINE - SECONDS - 40 )) --out "$OUT" \
      --cases ${CASES:-1.3b-b1-128-8,1.3b-b1-512-32,350m-b64-128-8,350m-b64-512-32} 2>&1 | grep -v Warning
    ;;
  launchdiff)
    mkdir -p /tmp/rp /tmp/htd
    # how each admit is cut into command buffers (one graph launch each) and what runs between them
    timeout $(lim 120) python bench/admit_hlo.py --cases 350m-1-128-8,1.3b-1-128-8 --dump "$OUT/admit_hlo" 2>&1 \
      | grep -v Warning | grep '^{'
    timeout $(lim 150) python bench/request_phases.py --cases 350m-1-128-8,1.3b-1-128-8 --reps 7 --out /tmp/rp \
      --save-trace /tmp/htd 2>&1 | grep -v Warning | grep '^{'
    for f in /tmp/htd/*.json.gz; do
      echo "== $f"
      timeout 60 python bench/host_trace.py "$f" --min-us 40 --depth 8 2>&1 \
        | grep -i 'execute\|graph\|command\|update\|launch\|prefill_insert\|busy' | head -40
    done
    ;;
  kvwrite)
    mkdir -p /tmp/rp
    for set in "" "ftjax.engine.PREFILL_WRITES_KV:True"; do
      echo "== PREFILL_WRITES_KV ${set:+on}${set:-off}"
      timeout $(lim 100) python bench/request_phases.py --cases 1.3b-1-128-8,350m-64-128-8 --reps 5 --out /tmp/rp \
        ${set:+--set $set} 2>&1 | grep -v Warning | grep '^{' | rows 4
    done
    KV="exact;set:ftjax.engine.PREFILL_WRITES_KV=true"
    timeout $(lim 150) python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-128-8,1-512-32 \
      --reps 7 --variants "off=exact,kv=$KV,off2=exact,kv2=$KV" --json "$OUT/kvwrite_1.3b.jsonl" 2>&1 | grep -v Warning
    timeout $(lim 150) python bench/request_ab.py --isolate --model 350m --weights bf16 --cases 64-128-8,64-512-32 \
      --reps 5 --variants "off=exact,kv=$KV,off2=exact,kv2=$KV" --json "$OUT/kvwrite_350m.jsonl" 2>&1 | grep -v Warning
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
