#!/usr/bin/env bash
# Stop training and delete the slice (its queued resource and TPU VM). Checkpoints on GCS are kept.
#
#   tpu/delete.sh --name st5
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_HELP'
Usage: tpu/delete.sh [options]

Deletes the queued resource NAME-qr and its TPU VM NAME (gcloud ... queued-resources delete --force), which
also stops any training on it. Nothing in the GCS workdir is touched, so a later run resumes from there.

Options:
  --async        return without waiting for the deletion to finish
  --quiet        do not ask for confirmation
EOF_HELP
  common_help
}

async=0
quiet=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --async) async=1; shift ;;
    --quiet | -q) quiet=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
location_flags
args=(gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${LOC[@]}" --force)
if [[ "$quiet" == 1 ]]; then
  args+=(--quiet)
fi
if [[ "$async" == 1 ]]; then
  args+=(--async)
fi
run "${args[@]}"
