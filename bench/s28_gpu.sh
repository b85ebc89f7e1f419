#!/usr/bin/env bash
# Twenty-eighth session's device parts. Results land in $OUT (or ./out).
#   bash bench/s28_gpu.sh stream   # bench/stream_bound.py: a read-only kernel chain with the projections' byte sizes
#                                  # (four kernels a layer, one a layer, one over 8 layers) at 1.3B and 350M, bf16 and
#                                  # int8: what any kernel-per-projection step can reach (about 3 minutes)
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DEADLINE=${DEADLINE:-570}
for part in "${@:-stream}"; do
case "$part" in
  stream)
    timeout $(lim 240) python bench/stream_bound.py --models ${MODELS:-1.3b,350m} --dtypes bf16,int8 --pdl ${PDLS:-on} \
      --json "$OUT/stream.jsonl" 2>&1 | grep -v Warning
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
