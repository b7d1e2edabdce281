#!/usr/bin/env bash
# Starts N moetrain processes on this machine, joined by jax.distributed over localhost: the
# multi-host code path (per-process data, cross-process collectives) on one CPU-only machine.
set -euo pipefail

PROG=launch/local_multiprocess.sh

usage() {
  cat <<EOF
Usage: $PROG N [--devices-per-process K] [--port P] [--dry-run] [--help] -- COMMAND...

Starts N CPU processes running COMMAND (for example: .venv/bin/python -m moetrain.train --config
configs/tiny.py --workdir runs/mp), each with K host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=K, JAX_PLATFORMS=cpu) and the flags
  --coordinator_address 127.0.0.1:P --num_processes N --process_id I
appended, I = 0 … N-1. Waits for all of them; if one fails the others are stopped and the
launcher exits with that process's status.

  --devices-per-process K  host devices per process (default 4)
  --port P                 coordinator port (default: a free port)
  --dry-run                print the commands and exit 0
  --help                   this text
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

num_processes=""
devices_per_process=4
port=""
dry_run=0
while (($#)); do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --devices-per-process) (($# >= 2)) || die "--devices-per-process needs a value"
      devices_per_process=$2; shift 2 ;;
    --devices-per-process=*) devices_per_process=${1#*=}; shift ;;
    --port) (($# >= 2)) || die "--port needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $num_processes ]] || die "unexpected argument $1 (the command goes after --)"
      num_processes=$1; shift ;;
  esac
done
command=("$@")

[[ -n $num_processes ]] || die "the number of processes N is missing (see --help)"
is_count "$num_processes" || die "N=$num_processes: expected a positive integer"
is_count "$devices_per_process" || die "--devices-per-process $devices_per_process: expected a positive integer"
((${#command[@]})) || die "no command after -- (see --help)"
if [[ -z $port ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
  die "--port $port: expected 1-65535"
fi

# Keep any other XLA flags of the caller, but this launcher decides the device count.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

process_command() {  # the full command line of process $1, one word per array element
  local index=$1
  words=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu "${command[@]}"
    --coordinator_address "127.0.0.1:$port" --num_processes "$num_processes"
    --process_id "$index")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i"
    printf '%q ' "${words[@]}"
    printf '&\n'
  done
  printf 'wait  # %d processes, %d devices each, %d in all\n' \
    "$num_processes" "$devices_per_process" $((num_processes * devices_per_process))
  exit 0
fi

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  process_command "$i"
  "${words[@]}" &
  pids+=("$!")
done

status=0
for ((left = num_processes; left > 0; left--)); do
  if wait -n; then
    continue
  else
    status=$?
  fi
  echo "$PROG: a process exited with status $status; stopping the others" >&2
  stop_all
  break
done
wait "${pids[@]}" 2>/dev/null || true
exit "$status"
