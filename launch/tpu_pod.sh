#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice: sets up the venv on each worker, then starts
# `python -m moetrain.train` on all of them at once, detached from the ssh session;
# jax.distributed finds its peers itself.
set -euo pipefail

PROG=launch/tpu_pod.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Flags that let XLA overlap collectives with compute on TPU, as MaxText's TPU scripts set them
# (github.com/AI-Hypercomputer/maxtext). TPU compiler flags go in LIBTPU_INIT_ARGS, not XLA_FLAGS.
TPU_FLAGS="--xla_tpu_enable_async_collective_fusion=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
TPU_FLAGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
TPU_FLAGS+=" --xla_tpu_overlap_compute_collective_tc=true"
TPU_FLAGS+=" --xla_enable_async_all_gather=true"
# The expert exchange's all-to-alls run asynchronously, so with model.moe.exchange_chunks > 1
# one chunk's exchange overlaps another chunk's expert matmuls.
TPU_FLAGS+=" --xla_tpu_enable_async_all_to_all=true"

usage() {
  cat <<EOF
Usage: $PROG --name TPU --zone ZONE [--project P] [--repo URL] [--dir DIR]
       [--dry-run] [--help] -- TRAIN_ARGS...

Runs on all workers of the TPU VM TPU (gcloud compute tpus tpu-vm ssh --worker=all):
  1. with --repo: git clone URL into DIR where DIR does not exist yet;
  2. cd DIR && make install, then pip install 'jax[tpu]==<setup.py's jax>' -e '.[gcs]'
     into DIR/.venv (skipped when that install is newer than setup.py);
  3. MOETRAIN_DISTRIBUTED=auto LIBTPU_INIT_ARGS=<collective-overlap flags>
     .venv/bin/python -m moetrain.train TRAIN_ARGS, detached (setsid nohup), its output in
     DIR/logs/train-<time>.log on each worker; the launcher prints how to follow and stop it.
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
  $PROG --name my-v5p-64 --zone us-east5-a -- --config configs/tiny.py \\
      --workdir gs://BUCKET/runs/pod
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

# The TPU wheels of the jax version setup.py pins, so they match the rest of the install.
jax_version=$(sed -nE "s/^ *'jax==([^']+)',.*/\1/p" "$ROOT/setup.py")
[[ -n $jax_version ]] || die "no 'jax==VERSION' pin found in $ROOT/setup.py"

gcloud_base=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone")
[[ -z $project ]] || gcloud_base+=("--project=$project")

quoted_dir=$(printf '%q' "$dir")
setup=""
[[ -z $repo ]] || setup+="test -d $quoted_dir || git clone $(printf '%q' "$repo") $quoted_dir && "
setup+="cd $quoted_dir && make install PYTHON=python3"
# Once per venv: the stamp names the pin and is older than setup.py after any pin changes.
stamp=".venv/.installed-jax-tpu-$jax_version-gcs"
setup+=" && { test $stamp -nt setup.py || { .venv/bin/python -m pip install --quiet"
setup+=" 'jax[tpu]==$jax_version' -e '.[gcs]' && touch $stamp; }; }"

# Training outlives the ssh session (a dropped connection must not end the job): setsid and
# nohup detach it, and with every stream redirected ssh returns at once. Its console output goes
# to a log on each worker's own disk, not into the workdir: a gs:// workdir cannot be appended
# to, and each worker's errors are its own. Metrics and checkpoints still go to the workdir.
# The braces keep `&` to the trainer alone, not the whole `cd && ...` list.
log="logs/train-$(date +%Y%m%d-%H%M%S)"
train="cd $quoted_dir && mkdir -p logs && { MOETRAIN_DISTRIBUTED=auto"
train+=" LIBTPU_INIT_ARGS=\"$TPU_FLAGS\" TF_CPP_MIN_LOG_LEVEL=2 setsid nohup"
train+=" .venv/bin/python -m moetrain.train$(printf ' %q' "${train_args[@]}")"
train+=" > $log.log 2>&1 < /dev/null & echo \$! > $log.pid; }"

single_quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
# A gcloud ssh command as one would type it: $1 the workers (all, 0, ...), $2 what they run.
shown() {
  printf '%q ' "${gcloud_base[@]}" "--worker=$1"
  printf -- '--command %s' "$(single_quoted "$2")"
}

for step in setup train; do
  if ((dry_run)); then
    shown all "${!step}"
    echo
  else
    echo "$PROG: $step on all workers of $name" >&2
    "${gcloud_base[@]}" --worker=all --command "${!step}"
  fi
done

# Worker 0 runs process 0, which prints the summary, progress and losses. SIGTERM stops the run
# as a preemption does: every process saves the same step, and the same command resumes.
echo "$PROG: training is detached from ssh; its output goes to $dir/$log.log on each worker" >&2
echo "  follow worker 0: $(shown 0 "tail -f $quoted_dir/$log.log")" >&2
echo "  stop, saving a checkpoint: $(shown all "kill \$(cat $quoted_dir/$log.pid)")" >&2
