#!/usr/bin/env bash
# Submits a SLURM job that trains on N GPU nodes: one task per node (each sees all of its
# node's GPUs), joined by jax.distributed, which reads the job layout from SLURM itself.
set -euo pipefail

PROG=launch/gpu_slurm.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Lets XLA move collectives to overlap them with compute (JAX's GPU performance tips and
# NVIDIA JAX-Toolbox, which sets them in its images): with model.moe.exchange_chunks > 1 one
# chunk's expert all-to-all runs on its own stream while another chunk's experts compute.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
GPU_XLA_FLAGS+=" --xla_gpu_enable_highest_priority_async_stream=true"

usage() {
  cat <<EOF
Usage: $PROG --nodes N [--gpus-per-node G] [--partition P] [--time T] [--account A]
       [--job-name NAME] [--jax-extra EXTRA] [--dry-run] [--help] -- TRAIN_ARGS...

Writes a batch script and submits it with sbatch from this directory (the repository, on
storage every node sees). The job runs make install, then pip install
'jax[EXTRA]==<setup.py's jax>' -e '.[gcs]' into .venv (skipped when that install is newer
than setup.py), then
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 env MOETRAIN_DISTRIBUTED=auto XLA_FLAGS=<GPU flags>
       .venv/bin/python -m moetrain.train TRAIN_ARGS

  --nodes N          nodes (one process each)
  --gpus-per-node G  GPUs per node (default 8)
  --partition P      SLURM partition (default: the cluster's)
  --time T           time limit, e.g. 04:00:00 (default: the partition's)
  --account A        SLURM account (default: yours)
  --job-name NAME    default moetrain
  --jax-extra EXTRA  the jax extra to install (default cuda12)
  --dry-run          print the sbatch command and the batch script, submit nothing
  --help             this text

Example:
  $PROG --nodes 2 --gpus-per-node 8 -- --config configs/tiny.py --workdir runs/gpu
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

nodes=""
gpus_per_node=8
partition=""
time_limit=""
account=""
job_name=moetrain
jax_extra=cuda12
dry_run=0
while (($#)); do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --nodes | --gpus-per-node | --partition | --time | --account | --job-name | --jax-extra)
      (($# >= 2)) || die "$1 needs a value"
      value=$2
      case $1 in
        --nodes) nodes=$value ;;
        --gpus-per-node) gpus_per_node=$value ;;
        --partition) partition=$value ;;
        --time) time_limit=$value ;;
        --account) account=$value ;;
        --job-name) job_name=$value ;;
        --jax-extra) jax_extra=$value ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    *) die "unexpected argument $1 (training arguments go after --; see --help)" ;;
  esac
done
train_args=("$@")

[[ -n $nodes ]] || die "--nodes is missing (see --help)"
is_count "$nodes" || die "--nodes $nodes: expected a positive integer"
is_count "$gpus_per_node" || die "--gpus-per-node $gpus_per_node: expected a positive integer"
((${#train_args[@]})) || die "no training arguments after -- (see --help)"
[[ $jax_extra =~ ^[a-z0-9_-]+$ ]] || die "--jax-extra $jax_extra: expected an extra like cuda12"

# The GPU wheels of the jax version setup.py pins, so they match the rest of the install.
jax_version=$(sed -nE "s/^ *'jax==([^']+)',.*/\1/p" "$ROOT/setup.py")
[[ -n $jax_version ]] || die "no 'jax==VERSION' pin found in $ROOT/setup.py"
# Once per venv: the stamp names the pin and is older than setup.py after any pin changes.
stamp=".venv/.installed-jax-$jax_extra-$jax_version-gcs"

batch_script() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  echo '#SBATCH --exclusive'
  echo "#SBATCH --output=$job_name-%j.out"
  [[ -z $partition ]] || echo "#SBATCH --partition=$partition"
  [[ -z $time_limit ]] || echo "#SBATCH --time=$time_limit"
  [[ -z $account ]] || echo "#SBATCH --account=$account"
  echo 'set -euo pipefail'
  echo 'make install PYTHON=python3'
  echo "test $stamp -nt setup.py || { .venv/bin/python -m pip install --quiet" \
    "'jax[$jax_extra]==$jax_version' -e '.[gcs]' && touch $stamp; }"
  printf 'srun --ntasks-per-node=1 --kill-on-bad-exit=1 env MOETRAIN_DISTRIBUTED=auto XLA_FLAGS=%q' "$GPU_XLA_FLAGS"
  printf ' TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m moetrain.train'
  printf ' %q' "${train_args[@]}"
  printf '\n'
}

if ((dry_run)); then
  echo "sbatch <<'EOF'"
  batch_script
  echo 'EOF'
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
batch_script | sbatch
