#!/usr/bin/env bash
# N CPU processes on this machine joined by JAX's multi-controller runtime (coordinator on 127.0.0.1, gloo
# collectives): the same program a TPU pod or a SLURM job runs, on a laptop. Used by tests/test_multihost.py.
#
# Usage:  launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]
# e.g.    launch/local_multiprocess.sh 2 2 -- d3pm-train --config=configs/test.py --workdir=/tmp/mp
#
# Each process runs COMMAND --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I with
# DEVICES_PER_PROCESS fake CPU devices. Process 0 prints to this terminal; process I>0 logs to
# $LOG_DIR/process_I.log (LOG_DIR defaults to a new temporary directory). PORT is a free port outside the
# kernel's ephemeral range unless $PORT is set.
# Exits with the first non-zero status of any process, after stopping the others.
set -euo pipefail

if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
for value in "$num_processes" "$devices"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers; got '$value'" >&2
    exit 2
  fi
done

python_bin=${PYTHON:-python3}
# A free port outside the kernel's ephemeral range: the kernel never hands those to outgoing connections, so the
# port cannot be taken between this check and the coordinator's bind (a port from bind(0) could be).
port=${PORT:-$("$python_bin" - <<'PY'
import random, socket
try:
  low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
except OSError:
  low, high = 32768, 60999
ports = [p for p in list(range(max(1024, low - 8192), low)) + list(range(high + 1, 65536))]
random.shuffle(ports)
for port in ports:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      continue
  print(port)
  break
PY
)}
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < num_processes; i++)); do
  args=("$@" "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$i")
  if [[ $i -eq 0 ]]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu "${args[@]}" &
  else
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu "${args[@]}" \
      >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "launched $num_processes processes x $devices CPU devices (coordinator 127.0.0.1:$port; logs of processes" \
  "1.. in $log_dir)" >&2

# Poll rather than `wait -n` (bash >= 5.1 only): a failure stops the rest instead of leaving them waiting on
# collectives that can never complete.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      wait "$pid" || status=$?
      if ((status != 0)); then
        echo "$0: a process exited with status $status; stopping the others (logs in $log_dir)" >&2
        exit "$status"
      fi
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]} == 0)) || sleep 0.2
done
exit "$status"
