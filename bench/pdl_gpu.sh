#!/usr/bin/env bash
# Programmatic dependent launch (ftjax.pallas._common.PDL) on the GPU, one part per device call:
#   bash bench/pdl_gpu.sh probe   # does PDL reach the Pallas kernels? a chain of dependent kernels, PDL off/on,
#                                 # per XLA_FLAGS variant; then the models decode bitwise the same (check_pdl.py);
#                                 # then the 1.3B decode step A/B (bf16)
#   bash bench/pdl_gpu.sh ab      # decode step A/B, 1.3B, bf16 and int8 (and the variants measured with it)
#   bash bench/pdl_gpu.sh ab350   # PDL on (the default) against off: 350M, batch 1 and 64
# Results land in $OUT (or ./out).
. "$(dirname "$0")/gpu_env.sh"
ON=@ftjax.pallas._common.PDL:True
OFF=@ftjax.pallas._common.PDL:False
case "${1:-probe}" in
  probe)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    timeout 150 python bench/pdl_probe.py --chain 256 --programs 132,528 --reps 20 \
      --variants 'default=' 'pdl_true=--xla_gpu_enable_pdl=true' 'pdl_false=--xla_gpu_enable_pdl=false' \
      2>&1 | tee "$OUT/pdl_probe.jsonl"
    timeout 120 python tests/gpu/check_pdl.py 2>&1 | tail -10
    timeout 240 python bench/step_ab.py --models 1.3b --weights bf16 --small-m stats --modes "" \
      --sl "off=$OFF" "pdl=$ON" "off2=$OFF" "pdl2=$ON" --json "$OUT/pdl_ab.jsonl" 2>&1 | tail -8
    ;;
  ab)     # PDL against off, and one attention split (no XLA merge kernel between the attention and the o
          # projection), 1.3B; the run in bench/RESULTS.md also had a variant loading each projection's first W
          # tile before the wait (slower; removed)
    S1="@ftjax.pallas.decode_attention.APPEND_CONFIG:DecodeConfig(block_k=64,num_splits=1)"
    timeout 560 python bench/step_ab.py --models 1.3b --weights bf16,int8 --small-m stats --modes "" \
      --sl "off=$OFF" "pdl=$ON" "s1=$OFF;$S1" "off2=$OFF" --json "$OUT/pdl_ab2.jsonl" 2>&1 | tail -16
    ;;
  ab350)  # PDL on by default now: 350M at batch 1 and 64 against PDL off; the GPU check again
    timeout 120 python tests/gpu/check_pdl.py 2>&1 | tail -10
    timeout 200 python bench/step_ab.py --models 350m --weights bf16,int8 --small-m stats --modes "" \
      --sl default= "off=$OFF" default2= --json "$OUT/pdl_ab3.jsonl" 2>&1 | tail -8
    timeout 200 python bench/step_ab.py --models 350m --batch 64 --weights bf16,int8 --modes "" \
      --sl default= "off=$OFF" --json "$OUT/pdl_ab4.jsonl" 2>&1 | tail -6
    ;;
esac
