#!/usr/bin/env bash
# Fifteenth session, one device call: the batch-1 e2e cases (ftjax bf16 / int8-embed beside HF), then the
# server warm-up (bench/warmup.py, 1.3B; WARMUP=none for the baseline). Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
git log --oneline -1 2>/dev/null
timeout 75 python bench/warmup.py --model 1.3b --warmup "${WARMUP:-greedy,sampled}" --json "$OUT/warmup.jsonl" 2>&1 \
  | grep -v Warning | tail -2
timeout 460 python bench/e2e.py --cases 350m-b1-128-8,350m-b1-512-32,1.3b-b1-128-8,1.3b-b1-512-32,6.7b-b1-512-32 \
  --int8-mode int8-embed --budget 440 --out "$OUT" 2>&1 | tee "$OUT/e2e_b1.log" | tail -40
