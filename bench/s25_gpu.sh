#!/usr/bin/env bash
# Twenty-fifth session's device parts: the three switches the twenty-fourth built (off by default) timed in one call.
# Results land in $OUT (or ./out).
#   bash bench/s25_gpu.sh first   # whether the admit re-records its CUDA graph each call (bench/cb_probe.py), and
#                                 # with XLA's command-buffer update modes; packed q/k/v on 350M batch-64 requests
#                                 # (a process per variant, each twice). As run in the session it also probed
#                                 # engine.STAGE_WORDS and timed bench/gemm_act.py's kernel: both removed after
#                                 # (bench/RESULTS.md, twenty-fifth session)
#   bash bench/s25_gpu.sh admit1  # 1.3B batch-1 requests: packed + norm kernel everywhere + select insert ("all")
#   (its `next` part, never run, became bench/s26_gpu.sh's `launch` and `nodes`)
#   bash bench/s25_gpu.sh second  # MODELS/CASES/VARIANTS of request_ab (a follow-up on the first's winners)
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DEADLINE=${DEADLINE:-570}
P_ON="exact;set:ftjax.layers.attention.PACKED_QKV=true"
P_ALL="$P_ON;set:ftjax.models.gpt.NORM_KERNEL_MIN_ROWS=1;set:ftjax.engine.INSERT_SELECT=true"
case "${1:-first}" in
  first)
    timeout $(lim 100) python bench/cb_probe.py --model 1.3b --cases 1-128-8 --reps 3 2>&1 | grep -v Warning
    # XLA's command-buffer update modes (names differ across XLA versions; an unknown one stops at flag parsing)
    for mode in SKIP_TEMP VMM_PERSISTENT_TEMP; do
      echo "xla_gpu_command_buffer_update_mode=$mode:"
      XLA_FLAGS="--xla_gpu_command_buffer_update_mode=$mode" python -c "import jax; print(jax.devices())" 2>&1 | tail -2
      XLA_FLAGS="--xla_gpu_command_buffer_update_mode=$mode" timeout $(lim 75) python bench/cb_probe.py --model 1.3b \
        --cases 1-128-8 --reps 3 2>&1 | grep -v Warning | tail -6
    done
    timeout $(lim 210) python bench/request_ab.py --isolate --model 350m --weights bf16 --cases 64-128-8,64-512-32 \
      --reps 5 --variants "off=exact,on=$P_ON,off2=exact,on2=$P_ON" \
      --json "$OUT/packed_350m.jsonl" 2>&1 | grep -v Warning
    ;;
  admit1)
    timeout $(lim 230) python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-128-8,1-512-32 \
      --reps 7 --variants "off=exact,all=$P_ALL,off2=exact,all2=$P_ALL" \
      --json "$OUT/admit1_1.3b.jsonl" 2>&1 | grep -v Warning
    ;;
  second)
    for m in ${MODELS:-350m}; do
      timeout $(lim 280) python bench/request_ab.py --isolate --model $m --weights bf16 --cases ${CASES:-64-128-8} \
        --reps ${REPS:-5} --variants "${VARIANTS:-off=exact,on=$P_ON}" --json "$OUT/second_$m.jsonl" 2>&1 | grep -v Warning
    done
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
