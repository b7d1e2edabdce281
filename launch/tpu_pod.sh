#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice: sets up the venv on each worker, then starts
# `python -m moetrain.train` on all of them at once; jax.distributed finds its peers itself.
set -euo pipefail

PROG=launch/tpu_pod.sh

# Flags that let XLA overlap collectives with compute on TPU, as MaxText's TPU scripts set them
# (github.com/AI-Hypercomputer/maxtext). TPU compiler flags go in LIBTPU_INIT_ARGS, not XLA_FLAGS.
TPU_FLAGS="--xla_tpu_enable_async_collective_fusion=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
TPU_FLAGS+=" --xla_tpu_overlap_compute_collective_tc=true"
TPU_FLAGS+=" --xla_enable_async_all_gather=true"

usage() {
  cat <<EOF
Usage: $PROG --name TPU --zone ZONE [--project P] [--repo URL] [--dir DIR]
       [--dry-run] [--help] -- TRAIN_ARGS...

Runs on all workers of the TPU VM TPU (gcloud compute tpus tpu-vm ssh --worker=all):
  1. with --repo: git clone URL into DIR where DIR does not exist yet;
  2. cd DIR && make install, then pip install 'jax[tpu]' into DIR/.venv;
  3. MOETRAIN_DISTRIBUTED=auto LIBTPU_INIT_ARGS=<collective-overlap flags>
     .venv/bin/python -m moetrain.train TRAIN_ARGS
Every worker must see the same code in DIR (default: moetrain, under the login's home).
The workdir in TRAIN_ARGS should be shared storage (gs://… or NFS) or is per worker.

  --name TPU      the TPU VM (slice) name
  --zone ZONE     its zone
  --project P     the Google Cloud project (default: gcloud's configured one)
  --repo URL      clone moetrain from URL on workers that lack DIR
  --dir DIR       where the code lives on the workers (default moetrain)
  --dry-run       print the gcloud commands and exit 0
  --help          this text

Example:
  $PROG --name my-v5p-64 --zone us-east5-a -- --config configs/tiny.py --workdir runs/pod
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

name=""
zone=""
project=""
repo=""
dir=moetrain
dry_run=0
while (($#)); do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --name | --zone | --project | --repo | --dir)
      (($# >= 2)) || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    --name=* | --zone=* | --project=* | --repo=* | --dir=*)
      key=${1%%=*}; declare "${key#--}=${1#*=}"; shift ;;
    --) shift; break ;;
    *) die "unexpected argument $1 (training arguments go after --; see --help)" ;;
  esac
done
train_args=("$@")

[[ -n $name ]] || die "--name is missing (see --help)"
[[ -n $zone ]] || die "--zone is missing (see --help)"
((${#train_args[@]})) || die "no training arguments after -- (see --help)"

ssh_base=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all)
[[ -z $project ]] || ssh_base+=("--project=$project")

quoted_dir=$(printf '%q' "$dir")
setup=""
[[ -z $repo ]] || setup+="test -d $quoted_dir || git clone $(printf '%q' "$repo") $quoted_dir && "
setup+="cd $quoted_dir && make install PYTHON=python3"
setup+=' && .venv/bin/python -m pip install --quiet --upgrade "jax[tpu]"'
train="cd $quoted_dir && MOETRAIN_DISTRIBUTED=auto LIBTPU_INIT_ARGS=\"$TPU_FLAGS\""
train+=" TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m moetrain.train$(printf ' %q' "${train_args[@]}")"

single_quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

steps=(setup train)
for step in "${steps[@]}"; do
  cmd=("${ssh_base[@]}" --command "${!step}")
  if ((dry_run)); then
    printf '%q ' "${ssh_base[@]}"
    printf -- '--command %s\n' "$(single_quoted "${!step}")"
  else
    echo "$PROG: $step on all workers of $name" >&2
    "${cmd[@]}"
  fi
done
