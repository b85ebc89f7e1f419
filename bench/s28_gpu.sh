#!/usr/bin/env bash
# Twenty-eighth session's device parts. Results land in $OUT (or ./out).
#   bash bench/s28_gpu.sh stream   # bench/stream_bound.py: a read-only kernel chain with the projections' byte sizes
#                                  # (four kernels a layer, one a layer, one over 8 layers) at 1.3B and 350M, bf16 and
#                                  # int8: what any kernel-per-projection step can reach; then the 1.3B step's kernel shares, bf16 and int8
#                                  # (about 5 minutes)
#   bash bench/s28_gpu.sh table    # e2e rows beside HF in the time left to DEADLINE (CASES=...)
#   bash bench/s28_gpu.sh kvcheck  # tests/gpu/check_kvwrite.py: PREFILL_WRITES_KV on against off, compiled (~2 min)
#   bash bench/s28_gpu.sh kvwrite  # 1.3B batch-1 requests with PREFILL_WRITES_KV off / on, a process per variant (~3 min)
#   bash bench/s28_gpu.sh pieces   # the admit in 1 / 2 / 4 calls (engine.ADMIT_PIECES): admit phases, then requests
#   bash bench/s28_gpu.sh offline  # bench/offline_decode.py: 256 prompts on 64 slots, continuous batching (LLM.generate
#                                  # since the twenty-ninth session) against slot-sized static batches (~2 min)
# Run so far (twenty-eighth session): stream (bf16, int8; before --proj and int8b existed) and table. Next:
# pieces, kvcheck, kvwrite, then MODELS=1.3b stream (int8b: the int8 byte sizes as a plain stream; proj_*: the model's own
# projection kernel over the same bytes as one call a layer and one over 8 layers).
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DEADLINE=${DEADLINE:-570}
for part in "${@:-stream}"; do
case "$part" in
  stream)
    timeout $(lim 200) python bench/stream_bound.py --models ${MODELS:-1.3b,350m} --dtypes ${DTYPES:-bf16,int8,int8b} --pdl ${PDLS:-on} \
      --json "$OUT/stream.jsonl" 2>&1 | grep -v Warning
    # the same run's 1.3B decode steps, kernel by kernel (bench/step_shares.py), bf16 and int8, to set beside it
    for q in bf16 int8; do
      timeout $(lim 75) python bench/profile_decode.py --model 1.3b --steps 32 \
        $( [ $q = int8 ] && echo --quantize int8 ) --sequence "$OUT/seq13_$q.txt" 2>&1 | grep -v Warning | tail -3
      python bench/step_shares.py "$OUT/seq13_$q.txt" 2>&1 | tail -30
    done
    ;;
  kvcheck)
    # the prefill writing the K/V (engine.PREFILL_WRITES_KV) against the insert through the compiled kernels:
    # cache rows bitwise, tokens, log probs (head_dim 64 and 128); must pass before the switch goes on
    timeout $(lim 200) python tests/gpu/check_kvwrite.py 2>&1 | grep -v Warning | tail -24
    ;;
  kvwrite)
    # whole requests a process per variant, 1.3B batch 1 (the admit's GPU time was 3% lower with it on,
    # twenty-eighth session; requests within the spread in two process pairs)
    KV="exact;set:ftjax.engine.PREFILL_WRITES_KV=true"
    timeout $(lim 200) python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-128-8,1-512-32 \
      --reps 7 --variants "off=exact,kv=$KV,off2=exact,kv2=$KV" --json "$OUT/kvwrite_1.3b.jsonl" 2>&1 | grep -v Warning
    ;;
  pieces)
    # the admit cut into calls along the layers (engine.ADMIT_PIECES, off = 1): the admit's dispatch, wall and GPU
    # time a process per setting, then whole requests a process per variant (about 7 minutes)
    mkdir -p /tmp/rp
    for n in 1 2 4 1 2 4; do
      echo "== ADMIT_PIECES $n"
      timeout $(lim 60) python bench/request_phases.py --cases 1.3b-1-128-8,350m-64-128-8 --reps 5 --out /tmp/rp \
        --set ftjax.engine.ADMIT_PIECES:$n 2>&1 | grep -v Warning | grep '^{' | rows 0
    done
    P2="exact;set:ftjax.engine.ADMIT_PIECES=2"; P4="exact;set:ftjax.engine.ADMIT_PIECES=4"
    timeout $(lim 200) python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-128-8,1-512-32 \
      --reps 7 --variants "one=exact,p2=$P2,p4=$P4,one2=exact,p2b=$P2,p4b=$P4" --json "$OUT/pieces_1.3b.jsonl" 2>&1 \
      | grep -v Warning
    ;;
  offline)
    # continuous batching of more prompts than slots against static chunks, 350M bf16, the same tokens checked
    timeout $(lim 150) python bench/offline_decode.py --model 350m --prompts 256 --slots 64 --in 32,512 --out 16,256 \
      --reps 2 --json "$OUT/offline.jsonl" 2>&1 | grep -v Warning
    ;;
  table)
    # s27's table part (e2e beside HF eager / static) in the time left
    CASES=${CASES:-1.3b-b1-512-32,1.3b-b1-128-8,350m-b64-128-8,350m-b64-512-32} DEADLINE=$(( DEADLINE - SECONDS )) \
      bash bench/s27_gpu.sh table   # (gpu_env.sh has put us in the repository root)
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
