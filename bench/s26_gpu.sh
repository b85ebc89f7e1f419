#!/usr/bin/env bash
# Twenty-sixth session's device parts. Results land in $OUT (or ./out).
#   bash bench/s26_gpu.sh launch   # does any XLA command-buffer mode make the admit's graph launch cheaper? A batch-1
#                                  # request's phases (bench/request_phases.py: host time until the admit call returns,
#                                  # i.e. its CUDA graph's launch) in a process per XLA_FLAGS setting: default, the
#                                  # command buffers' commands strictly serialized (a straight-line graph, which the CUDA
#                                  # driver can launch in constant time), concurrent, PDL off, and cuBLAS outside the graphs
#                                  # (about 5 minutes: run `pack` as a second call)
#   bash bench/s26_gpu.sh nodes    # 1.3B batch-1 requests with the admit's node-count switches (s25's "next", shorter)
#   bash bench/s26_gpu.sh pack     # the packed q/k/v params (engine.PACK_QKV, on) against q, k, v apart: the admit's
#                                  # GPU time and kernel count (request_phases, a process each), then whole requests
#                                  # in one process (request_ab: its tokens must agree), 1.3B batch 1 and 350M batch 64
#   bash bench/s26_gpu.sh b64glue  # 350M batch-64 requests, a process per variant: the prefill's GEMMs on XLA's Triton
#                                  # emitter (which may take the bias + GELU into the GEMM, where cuBLAS never does), and
#                                  # attention.PACKED_QKV again now that the packed weight needs no concatenation
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DEADLINE=${DEADLINE:-570}
P_ON="exact;set:ftjax.layers.attention.PACKED_QKV=true"
P_ALL="$P_ON;set:ftjax.models.gpt.NORM_KERNEL_MIN_ROWS=1;set:ftjax.engine.INSERT_SELECT=true"
for part in "${@:-launch}"; do
case "$part" in
  launch)
    n=0
    # the last: cuBLAS GEMMs outside the graphs (XLA traces each into a child graph; the admit's launch costs ~5 us
    # a node against the decode step's ~1.7, and only the admit holds cuBLAS GEMMs)
    for flags in "" "--xla_gpu_command_buffer_scheduling_mode=SERIALIZE" "--xla_gpu_enable_pdl=false" \
                 "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" \
                 "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"; do
      n=$((n + 1)); tr=""
      # the first two settings also trace one request with the host (XLA's cuGraphLaunch and command-buffer events)
      [ $n -le 2 ] && tr="--save-trace /tmp/ht$n"
      echo "== XLA_FLAGS='$flags'"
      [ "$(lim 60)" -lt 50 ] && { echo "skipped: deadline"; continue; }
      mkdir -p /tmp/rp; XLA_FLAGS="$flags" python -c "import jax; print(jax.devices())" 2>&1 | tail -1
      XLA_FLAGS="$flags" timeout $(lim 100) python bench/request_phases.py --cases ${CASES:-350m-1-128-8,1.3b-1-128-8} \
        --reps 7 --out /tmp/rp $tr 2>&1 | grep -v Warning | grep '^{' | rows
      for f in /tmp/ht$n/1.3b*.json.gz; do
        [ -f "$f" ] && timeout 30 python bench/host_trace.py "$f" --min-us 150 --depth 4 2>&1 \
          | grep -i 'graph\|command\|prefill_insert\|generate_steps\|busy\|gpu' | head -30
      done
    done
    ;;
  nodes)
    S="set:ftjax.models.gpt.NORM_KERNEL_MIN_ROWS=1"; I="set:ftjax.engine.INSERT_SELECT=true"
    timeout $(lim 330) python bench/request_ab.py --isolate --model ${MODELS:-1.3b} --weights bf16 \
      --cases ${NCASES:-1-128-8,1-512-32} --reps 7 \
      --variants "off=exact,all=$P_ALL,select=exact;$I,off2=exact,all2=$P_ALL" \
      --json "$OUT/admit_nodes.jsonl" 2>&1 | grep -v Warning
    ;;
  pack)
    mkdir -p /tmp/rp
    for set in "" "ftjax.engine.PACK_QKV:False"; do   # GPU busy time and kernel count: one process each
      echo "== packed q/k/v ${set:+off ($set)}${set:-on}"
      [ "$(lim 60)" -lt 50 ] && { echo "skipped: deadline"; continue; }
      timeout $(lim 110) python bench/request_phases.py --cases ${PCASES:-1.3b-1-128-8,1.3b-1-512-32} --reps 7 \
        --out /tmp/rp ${set:+--set $set} 2>&1 | grep -v Warning | grep '^{' | rows 5
    done
    OFF="exact;set:ftjax.engine.PACK_QKV=false"
    timeout $(lim 200) python bench/request_ab.py --model 1.3b --weights bf16 --cases 1-128-8,1-512-32 --reps 7 \
      --variants "packed=exact,apart=$OFF,packed2=exact,apart2=$OFF" --json "$OUT/pack_1.3b.jsonl" 2>&1 | grep -v Warning
    timeout $(lim 200) python bench/request_ab.py --model 350m --weights bf16 --cases 64-128-8 --reps 5 \
      --variants "packed=exact,apart=$OFF,packed2=exact,apart2=$OFF" --json "$OUT/pack_350m.jsonl" 2>&1 | grep -v Warning
    ;;
  b64glue)
    timeout $(lim 330) python bench/request_ab.py --isolate --model 350m --weights bf16 --cases 64-128-8,64-512-32 \
      --reps 5 --variants "off=exact,triton=exact;admit:xla_gpu_cublas_fallback=false,pq=$P_ON,off2=exact" \
      --json "$OUT/b64glue_350m.jsonl" 2>&1 | grep -v Warning
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
