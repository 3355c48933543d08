#!/usr/bin/env bash
# Show, follow or fetch the training log of the slice's workers.
#
#   tpu/logs.sh --name st5 --follow              # stream worker 0
#   tpu/logs.sh --name st5 --fetch logs/st5      # copy every worker's log here (logs/st5/worker-N.log)
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_HELP'
Usage: tpu/logs.sh [options]

Options:
  --worker N     which worker's log to show or follow (0 logs the metrics) [0]; all: every worker
  --lines N      how many last lines to show [100]
  --follow       keep streaming (tail -f) until interrupted
  --fetch DIR    copy every worker's log to DIR/worker-N.log instead of showing it
EOF_HELP
  common_help
}

worker=0
lines=100
follow=0
fetch=""
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --worker) worker="${2:?--worker needs a value}"; shift 2 ;;
    --worker=*) worker="${1#*=}"; shift ;;
    --lines) lines="${2:?--lines needs a value}"; shift 2 ;;
    --lines=*) lines="${1#*=}"; shift ;;
    --follow | -f) follow=1; shift ;;
    --fetch) fetch="${2:?--fetch needs a directory}"; shift 2 ;;
    --fetch=*) fetch="${1#*=}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
n="$(num_workers)"
[[ "$worker" == all || ( "$worker" =~ ^[0-9]+$ && "$worker" -lt "$n" ) ]] \
  || die "--worker '$worker': $TPU_ACCELERATOR_TYPE has workers 0..$((n - 1)) (or all)"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines '$lines': expected a number"

if [[ -n "$fetch" ]]; then
  if [[ "$TPU_DRY_RUN" != 1 ]]; then
    mkdir -p "$fetch"
  fi
  for ((w = 0; w < n; w++)); do
    scp_workers "$w" "$TPU_NAME:embedjax-train.log" "$fetch/worker-$w.log"
  done
  exit 0
fi
tail_flags="-n $lines"
if [[ "$follow" == 1 ]]; then
  tail_flags+=" -F"
fi
ssh_workers "$worker" "tail $tail_flags $REMOTE_LOG"
