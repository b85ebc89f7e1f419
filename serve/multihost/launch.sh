#!/usr/bin/env bash
# Multi-host launch of one ftjax server per node (placeholder: this build serves from one process;
# `--num-processes > 1` is refused until multi-host sharding lands in ftjax/sharding/distributed.py).
#
# On every node i of N (process 0's address is the coordinator):
#   python -m ftjax.serve --model-repository serve/model_repository/gpt \
#       --tensor-parallel T --pipeline-parallel P \
#       --coordinator-address NODE0:1234 --num-processes N --process-id i \
#       --host 0.0.0.0 --grpc-port 8001 --metrics-port 8002
# T x P must equal the number of devices over all nodes (CONTRACTS.md, "Multi-host"); clients talk
# to process 0's gRPC port.
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port}" "${NUM_PROCESSES:?}" "${PROCESS_ID:?}"
exec python -m ftjax.serve "$@" --coordinator-address "$COORDINATOR" --num-processes "$NUM_PROCESSES" \
    --process-id "$PROCESS_ID"
