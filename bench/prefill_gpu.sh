#!/usr/bin/env bash
# Fifteenth session: the 512-token prefill at 1.3B, bf16 against int8. Results land in $OUT (or ./out).
#   bash bench/prefill_gpu.sh profile   # where its time goes (kernel lists of the prefill, bf16 and int8)
#   bash bench/prefill_gpu.sh ab        # int8 (and bf16) requests with the admit call's GEMMs all on XLA's
#                                       # Triton emitter (xla_gpu_cublas_fallback=false: the int8 -> bf16
#                                       # conversion fused into the GEMM) against the default; bf16 requests
#                                       # with XLA's dot merger off for the admit call (it concatenates the
#                                       # q/k/v weights every prefill to run one GEMM)
#   bash bench/prefill_gpu.sh norm64 [bf16|int8]  # sixteenth session: the prefill norm kernel (gpt.NORM_KERNEL, on
#                                       # from 4096 tokens) at batch-64 prefills, ABAB (the session's one pair:
#                                       # bench/s16_gpu.sh). int8: the seventeenth session's suspect for the int8 b64
#                                       # prefill that got 11 ms slower than the eleventh session's (bench/RESULTS.md)
#   bash bench/prefill_gpu.sh iso       # twenty-first session: norm64 (bf16, 512/32) and ab's dot-merger half again,
#                                       # a process per variant (request_ab --isolate)
#   bash bench/prefill_gpu.sh det       # twenty-first session: the same request's tokens across cold processes,
#                                       # XLA's GEMM autotuning off and on
#   (the nineteenth session's `gelu` part, run in the twentieth: XLA took no GELU into a cuBLASLt epilogue and the
#   switch it tested, mlp.ACT_LOW_ROWS, was removed; bench/gelu_epilogue_probe.py is the standalone check)
. "$(dirname "$0")/gpu_env.sh"
NOFB="exact;admit:xla_gpu_cublas_fallback=false"               # the admit's GEMMs all on XLA's Triton emitter
NOMERGE="exact;admit:xla_disable_hlo_passes=dot-merger"        # XLA's dot merger off for the admit
NORM_OFF="exact;set:ftjax.models.gpt.NORM_KERNEL=false"        # the prefill norm kernel off
case "${1:-profile}" in
  profile)
    for q in bf16 int8; do
      extra=""; [ "$q" = int8 ] && extra="--quantize int8"
      timeout 100 python bench/profile_decode.py --model 1.3b --prompt 512 --steps 4 $extra \
        --sequence "$OUT/pre512_$q.txt" 2>&1 | grep -v Warning | tail -22
    done
    ;;
  ab)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    timeout 115 python bench/request_ab.py --model 1.3b --weights int8 --cases 1-512-32 --reps 5 \
      --variants "exact,nofb=$NOFB,exact2=exact,nofb2=$NOFB" --json "$OUT/nofb.jsonl" 2>&1 | grep -v Warning
    timeout 115 python bench/request_ab.py --model 1.3b --weights bf16 --cases 1-512-32 --reps 5 \
      --variants "exact,nomerge=$NOMERGE,exact2=exact,nomerge2=$NOMERGE" --json "$OUT/nomerge.jsonl" 2>&1 | grep -v Warning
    ;;
  norm64)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    W=${2:-bf16}
    timeout 280 python bench/request_ab.py --model 1.3b --weights $W --cases 64-128-8,64-512-32 --reps 7 \
      --variants "on=exact,off=$NORM_OFF,on2=exact,off2=$NORM_OFF" --json "$OUT/norm64_$W.jsonl" 2>&1 | grep -v Warning
    ;;
  iso)
    # twenty-first session: the bf16 halves of `norm64` and `ab` again, a process per variant (request_ab --isolate):
    # both switches change what XLA compiles around the prefill's GEMMs, and in one process such variants can
    # take each other's time (bench/RESULTS.md, twentieth session)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    timeout 200 python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 64-512-32 --reps 5 \
      --variants "on=exact,off=$NORM_OFF,on2=exact,off2=$NORM_OFF" --json "$OUT/norm64_iso.jsonl" 2>&1 | grep -v Warning
    timeout 150 python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-512-32 --reps 5 \
      --variants "exact,nomerge=$NOMERGE,exact2=exact,nomerge2=$NOMERGE" --json "$OUT/nomerge_iso.jsonl" 2>&1 | grep -v Warning
    ;;
  det)
    # twenty-first session: greedy tokens of the same request in separate cold processes (no persistent cache), with
    # XLA's GEMM autotuning off (level 0: heuristics pick the algorithms) and on (the default); tokens by hash
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    A0="exact;admit:xla_gpu_autotune_level=0;generate:xla_gpu_autotune_level=0"
    timeout 220 python bench/request_ab.py --isolate --model 1.3b --weights bf16 --cases 1-512-32 --reps 2 \
      --variants "at0=$A0,at0b=$A0,exact,exact2=exact" --json "$OUT/det.jsonl" 2>&1 | grep -v Warning
    ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
