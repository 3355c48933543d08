# shellcheck shell=bash
# Shared by tpu/*.sh: flags, defaults, worker counts, and `run` (prints each gcloud command; runs it unless
# --dry-run). Source it; do not execute it.
#
# Every setting has a flag and an environment default:
#   --name NAME                 TPU_NAME                (default: embedjax-tpu)
#   --zone ZONE                 TPU_ZONE                (default: us-central2-b)
#   --project PROJECT           TPU_PROJECT             (default: gcloud's configured project)
#   --accelerator-type TYPE     TPU_ACCELERATOR_TYPE    (default: v4-32)
#   --dry-run                   TPU_DRY_RUN=1           print the gcloud commands, run nothing

set -euo pipefail

TPU_NAME="${TPU_NAME:-embedjax-tpu}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-32}"
TPU_DRY_RUN="${TPU_DRY_RUN:-0}"
# Where setup.sh installs embedjax on each worker, and where run.sh logs (used by the scripts sourcing this).
# shellcheck disable=SC2034
REMOTE_VENV="\$HOME/embedjax-venv"
# shellcheck disable=SC2034
REMOTE_LOG="\$HOME/embedjax-train.log"
# shellcheck disable=SC2034
REMOTE_PID="\$HOME/embedjax-train.pid"
# shellcheck disable=SC2034
REMOTE_CONFIGS="\$HOME/embedjax-configs"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Quote one word for a POSIX shell only when needed, so dry-run lines can be pasted (and parsed by tests).
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# run CMD ARG...: print the command (one line, quoted), then run it unless --dry-run.
run() {
  local out="" a
  for a in "$@"; do
    out+="$(quote "$a") "
  done
  if [[ "$TPU_DRY_RUN" == 1 ]]; then
    echo "${out% }"
  else
    echo "+ ${out% }" >&2
    "$@"
  fi
}

# Parse the shared flags out of "$@"; the rest is left in REST (an array). Call as: parse_common "$@".
parse_common() {
  REST=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --zone=*) TPU_ZONE="${1#*=}"; shift ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --project=*) TPU_PROJECT="${1#*=}"; shift ;;
      --accelerator-type) TPU_ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --accelerator-type=*) TPU_ACCELERATOR_TYPE="${1#*=}"; shift ;;
      --dry-run) TPU_DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name '$TPU_NAME': lowercase letters, digits and hyphens, starting with a letter"
  num_workers >/dev/null  # validates --accelerator-type
  if [[ "$TPU_DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); try --dry-run"
  fi
}

common_help() {
  cat <<'EOF'
Shared options (environment defaults in brackets):
  --name NAME               TPU VM / pod slice name [TPU_NAME, embedjax-tpu]
  --zone ZONE               zone [TPU_ZONE, us-central2-b]
  --project PROJECT         Google Cloud project [TPU_PROJECT, gcloud's default]
  --accelerator-type TYPE   v4-32, v5litepod-16 (= v5e-16), v5p-8, v6e-8 ... [TPU_ACCELERATOR_TYPE, v4-32]
  --dry-run                 print the exact gcloud commands and run nothing [TPU_DRY_RUN=1]
  -h, --help                this help
EOF
}

# gcloud's flags naming the zone and project, as an array in LOC.
location_flags() {
  LOC=("--zone=$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    LOC+=("--project=$TPU_PROJECT")
  fi
}

# The accelerator type as gcloud spells it (v5e-N is v5litepod-N).
gcloud_accelerator_type() {
  case "$TPU_ACCELERATOR_TYPE" in
    v5e-*) echo "v5litepod-${TPU_ACCELERATOR_TYPE#v5e-}" ;;
    *) echo "$TPU_ACCELERATOR_TYPE" ;;
  esac
}

# Number of TPU VM workers (hosts) of the slice: v4 / v5p sizes count TensorCores (8 per 4-chip host);
# v5e / v6e sizes count chips (up to 8 on one host, 4 per host beyond).
num_workers() {
  local t gen n
  t="$(gcloud_accelerator_type)"
  gen="${t%-*}"
  n="${t##*-}"
  [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || die "--accelerator-type '$TPU_ACCELERATOR_TYPE': expected e.g. v4-32, v5litepod-16"
  case "$gen" in
    v4 | v5p | v3 | v2) echo $(((n + 7) / 8)) ;;
    v5litepod | v6e)
      if ((n <= 8)); then echo 1; else echo $((n / 4)); fi
      ;;
    *) die "--accelerator-type '$TPU_ACCELERATOR_TYPE': unknown generation '$gen' (v2, v3, v4, v5p, v5litepod, v6e)" ;;
  esac
}

# The TPU VM software version matching the accelerator generation.
default_runtime_version() {
  case "$(gcloud_accelerator_type)" in
    v4-* | v3-* | v2-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for '$TPU_ACCELERATOR_TYPE'; pass --runtime-version" ;;
  esac
}

# ssh_workers WORKER COMMAND: run COMMAND on one worker (0, 1, ...) or on every worker (all).
ssh_workers() {
  local worker="$1" command="$2"
  location_flags
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" "--worker=$worker" "--command=$command"
}

# scp_workers WORKER SRC... DEST: gcloud compute tpus tpu-vm scp, to one worker or all.
scp_workers() {
  local worker="$1"
  shift
  location_flags
  run gcloud compute tpus tpu-vm scp "$@" "${LOC[@]}" "--worker=$worker"
}
