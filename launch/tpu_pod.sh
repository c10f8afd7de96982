#!/usr/bin/env bash
# Runs d3pm-train on every worker of a Cloud TPU VM pod slice at once (one process per host; JAX's
# multi-controller runtime finds the other hosts through the TPU metadata: --distributed=on).
#
# Usage:  launch/tpu_pod.sh TPU_NAME ZONE [d3pm-train flags...]
# e.g.    launch/tpu_pod.sh my-v5e-64 us-west4-a --config=configs/diffusion_1b.py --workdir=/shared/diffusion_1b
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REPO_DIR   where this repository lives on the workers (default: ~/d3pm_jax)
#   SYNC=1     first copy this checkout to REPO_DIR on every worker (gcloud ... scp --worker=all)
#   SETUP      command run on each worker before training (default: pip install -e "$REPO_DIR" "jax[tpu]")
# The workdir must be shared by all workers (NFS, Filestore, a gcsfuse mount): every host writes its shards of
# each checkpoint there. Process 0 alone writes metrics and prints results; worker logs stay on the workers.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [d3pm-train flags...]" >&2
  exit 2
fi
name=$1
zone=$2
shift 2
repo_dir=${REPO_DIR:-'~/d3pm_jax'}
setup=${SETUP:-"pip install -q -e $repo_dir 'jax[tpu]'"}
project_args=()
if [[ -n "${PROJECT:-}" ]]; then project_args=(--project="$PROJECT"); fi

if [[ "${SYNC:-0}" == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  gcloud compute tpus tpu-vm scp "${project_args[@]}" --zone="$zone" --worker=all --recurse "$here" \
    "$name:$repo_dir"
fi

# Each flag is quoted for the remote shell, so values with spaces or quotes arrive intact.
flags=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" "${project_args[@]}" --zone="$zone" --worker=all \
  --command="cd $repo_dir && $setup && d3pm-train --distributed=on$flags"
