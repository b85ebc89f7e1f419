# Sourced by the bench/*_gpu.sh scripts (`. "$(dirname "$0")/gpu_env.sh"`): fail a pipeline on its first
# command, unbuffered Python output, results under $OUT (or ./out), and the repository root as the working directory.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
