#!/usr/bin/env bash
# Starts N training processes on this machine, joined over loopback with gloo CPU collectives:
# the multi-process code path of a pod, on one host (each process gets its share of the data).
#
#   launch/local_processes.sh 2 configs/tiny.py /tmp/emu_2proc --config.train.steps=100
#
# Each process logs to WORKDIR/process_<i>.log; the script waits for all and fails if any fails.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG WORKDIR [--config.overrides ...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$workdir"
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m emu_jax.train --config="$config" --workdir="$workdir" \
    --config.distributed.coordinator="127.0.0.1:$port" --config.distributed.num_processes="$n" \
    --config.distributed.process_id="$i" --config.distributed.cpu_collectives=gloo "$@" \
    >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
