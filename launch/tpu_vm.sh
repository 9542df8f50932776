#!/usr/bin/env bash
# Starts one training run on every host of a Cloud TPU VM pod slice. The slice must exist
# (gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=v5p-128 --version=...).
#
#   launch/tpu_vm.sh NAME ZONE BUCKET RUN CONFIG [--config.overrides ...]
#   e.g. launch/tpu_vm.sh emu-v5p us-east5-a my-bucket emu2_stage2 configs/emu2_37b.py:stage2 \
#            --config.data.data_dir=/mnt/my-bucket/data
#
# 1. copies this checkout (git archive of HEAD) to ~/emu_jax on every worker and installs it with
#    jax[tpu];
# 2. mounts gs://BUCKET at /mnt/BUCKET on every worker with gcsfuse (checkpoints, metrics and the
#    ArrayRecord shards live there, so a preempted slice loses nothing);
# 3. runs `python -m emu_jax.train` on all workers at once with --config.distributed.auto=True:
#    JAX finds the other hosts from the TPU metadata. The workdir is /mnt/BUCKET/runs/RUN; rerunning
#    the script resumes from its latest checkpoint. Each worker logs to ~/emu_jax/train.log.
# Environment passed through when set: LIBTPU_INIT_ARGS (XLA/TPU flags), EMU_JAX_EXTRA_PIP (more packages).
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 TPU_NAME ZONE BUCKET RUN CONFIG [--config.overrides ...]" >&2
  exit 2
fi
name=$1 zone=$2 bucket=$3 run=$4 config=$5
shift 5
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

archive=$(mktemp -d)/emu_jax.tar.gz
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name":emu_jax.tar.gz --zone="$zone" --worker=all
ssh_all "mkdir -p ~/emu_jax && tar -xzf ~/emu_jax.tar.gz -C ~/emu_jax && \
  pip install -q -e ~/emu_jax 'jax[tpu]' ${EMU_JAX_EXTRA_PIP:-} && \
  (mountpoint -q /mnt/$bucket || (sudo mkdir -p /mnt/$bucket && sudo chown \$USER /mnt/$bucket && \
   gcsfuse --implicit-dirs $bucket /mnt/$bucket))"

overrides=$(printf ' %q' "$@")
ssh_all "cd ~/emu_jax && export LIBTPU_INIT_ARGS='${LIBTPU_INIT_ARGS:-}' && \
  python -m emu_jax.train --config=$config --workdir=/mnt/$bucket/runs/$run --config.distributed.auto=True \
  $overrides 2>&1 | tee -a ~/emu_jax/train.log"
