# Sourced by the bench/*_gpu.sh scripts (`. "$(dirname "$0")/gpu_env.sh"`): fail a pipeline on its first
# command, unbuffered Python output, results under $OUT (or ./out), the repository root as the working directory,
# and `lim N`: N seconds or what is left until $DEADLINE (seconds of the script's own clock, $SECONDS), if less;
# `rows N`: bench/request_phases.py's JSON rows from stdin, each with only its N costliest admit kernels.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
lim() { local l=$(( ${DEADLINE:-100000} - SECONDS )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
rows() { python -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); r['admit_top'] = r.get('admit_top', [])[:${1:-0}]; print(json.dumps(r))"; }
