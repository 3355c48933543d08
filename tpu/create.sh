#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice through a queued resource (spot or on-demand), and wait until it is ready.
#
#   tpu/create.sh --name st5 --zone us-central2-b --accelerator-type v4-32 --spot
#   tpu/create.sh --name st5 --zone us-west4-a --accelerator-type v5litepod-16 --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_HELP'
Usage: tpu/create.sh [options]

Requests a TPU slice as a queued resource (gcloud compute tpus queued-resources create) named NAME-qr with
node NAME, then waits until it is ACTIVE (unless --no-wait).

Options:
  --runtime-version V   TPU VM software version [default by generation: v4 tpu-ubuntu2204-base,
                        v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --spot                spot capacity: cheaper, can be preempted at any time (default)
  --on-demand           on-demand capacity (needs quota)
  --reserved            use the project's reservation
  --valid-until-duration D  give up if not provisioned within D (e.g. 6h) [default: none]
  --no-wait             return once the request is queued
EOF_HELP
  common_help
}

runtime_version=""
capacity="spot"
wait_ready=1
valid_until=""
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --runtime-version) runtime_version="${2:?--runtime-version needs a value}"; shift 2 ;;
    --runtime-version=*) runtime_version="${1#*=}"; shift ;;
    --spot) capacity="spot"; shift ;;
    --on-demand) capacity="on-demand"; shift ;;
    --reserved) capacity="reserved"; shift ;;
    --valid-until-duration) valid_until="${2:?--valid-until-duration needs a value}"; shift 2 ;;
    --no-wait) wait_ready=0; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
runtime_version="${runtime_version:-$(default_runtime_version)}"
accel="$(gcloud_accelerator_type)"
location_flags

args=(gcloud compute tpus queued-resources create "${TPU_NAME}-qr" "--node-id=$TPU_NAME" "${LOC[@]}"
  "--accelerator-type=$accel" "--runtime-version=$runtime_version")
case "$capacity" in
  spot) args+=(--spot) ;;
  reserved) args+=(--reserved) ;;
  on-demand) ;;
esac
if [[ -n "$valid_until" ]]; then
  args+=("--valid-until-duration=$valid_until")
fi
echo "# $accel: $(num_workers) worker(s), $capacity, runtime $runtime_version" >&2
run "${args[@]}"

if [[ "$wait_ready" == 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" "${LOC[@]}" "--format=value(state.state)")
  if [[ "$TPU_DRY_RUN" == 1 ]]; then
    run "${describe[@]}"   # polled every 30 s until ACTIVE
  else
    while true; do
      state="$(run "${describe[@]}")"
      echo "queued resource ${TPU_NAME}-qr: $state" >&2
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource ${TPU_NAME}-qr is $state; tpu/delete.sh --name $TPU_NAME, then retry" ;;
      esac
      sleep 30
    done
  fi
fi
