#!/usr/bin/env bash
# Run the same `embedjax train` on every worker of the slice (--worker=all), detached, logging to
# ~/embedjax-train.log on each worker. Re-running with the same --workdir resumes from its latest checkpoint.
#
#   tpu/run.sh --name st5 --config configs/sentence_t5.py:base --workdir gs://BUCKET/runs/st5_base \
#       -- --config.batch_size=1024 --config.num_steps=5000
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_HELP'
Usage: tpu/run.sh [options] --config configs/NAME.py[:variant] --workdir gs://BUCKET/PATH [-- --config.KEY=VALUE ...]

Copies the config file to every worker, then starts `embedjax train` on all of them at once (a pod slice is one
JAX program: every host must run the same command). Checkpoints, metrics.jsonl and TensorBoard events go to the
workdir; a run that finds checkpoints there resumes from the latest one (so after a preemption: recreate,
set up, and run the same command again).

Options:
  --config SPEC     configs/NAME.py[:variant] (a local file; copied to the workers)
  --workdir DIR     gs://BUCKET/PATH (shared by all workers; a local path would split the run per host)
  --env KEY=VALUE   environment variable for the run, repeatable (e.g. --env LIBTPU_INIT_ARGS=...)
  --foreground      stay attached and stream worker 0's output (the run stops if ssh drops)
  --stop            stop a running training on every worker (kills the pid run.sh recorded) and exit
  Everything after -- is passed to `embedjax train` (dotted config overrides).
EOF_HELP
  common_help
}

config=""
workdir=""
foreground=0
stop=0
envs=()
extra=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --config=*) config="${1#*=}"; shift ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --workdir=*) workdir="${1#*=}"; shift ;;
    --env) envs+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --foreground) foreground=1; shift ;;
    --stop) stop=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help; train overrides go after --)" ;;
  esac
done

if [[ "$stop" == 1 ]]; then
  ssh_workers all "if [ -f $REMOTE_PID ]; then kill \$(cat $REMOTE_PID) 2>/dev/null && echo \"\$(hostname): stopped\" || echo \"\$(hostname): not running\"; rm -f $REMOTE_PID; else echo \"\$(hostname): no run\"; fi"
  exit 0
fi

[[ -n "$config" ]] || die "--config is required (configs/NAME.py[:variant])"
[[ -n "$workdir" ]] || die "--workdir is required (gs://BUCKET/PATH)"
[[ "$workdir" == gs://* ]] || die "--workdir '$workdir': use a gs:// path every worker shares"
config_file="${config%%:*}"
variant=""
if [[ "$config" == *:* ]]; then
  variant=":${config#*:}"
fi
if [[ "$TPU_DRY_RUN" != 1 && ! -f "$config_file" ]]; then
  die "--config $config_file: no such file"
fi
for e in "${envs[@]+"${envs[@]}"}"; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$e': expected KEY=VALUE"
done
for o in "${extra[@]+"${extra[@]}"}"; do
  [[ "$o" == --config.*=* ]] || die "'$o' after --: only --config.KEY=VALUE overrides are passed to embedjax train"
done

remote_config="embedjax-configs/$(basename "$config_file")"   # relative to the home directory ssh starts in
ssh_workers all "mkdir -p $REMOTE_CONFIGS"
scp_workers all "$config_file" "$TPU_NAME:embedjax-configs/"

train="$REMOTE_VENV/bin/embedjax train --config $(quote "$remote_config$variant") --workdir $(quote "$workdir")"
for o in "${extra[@]+"${extra[@]}"}"; do
  train+=" $(quote "$o")"
done
prefix=""
for e in "${envs[@]+"${envs[@]}"}"; do
  prefix+="export $(quote "$e"); "
done
if [[ "$foreground" == 1 ]]; then
  remote="${prefix}set -o pipefail; $train 2>&1 | tee $REMOTE_LOG"   # the run's exit status, not tee's
else
  # Detached: survives the ssh session; the pid file lets run.sh --stop end it.
  remote="${prefix}if [ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then echo \"\$(hostname): already running (pid \$(cat $REMOTE_PID)); run.sh --stop first\"; exit 1; fi; "
  remote+="nohup $train > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; echo \"\$(hostname): started pid \$!\""
fi
ssh_workers all "$remote"
if [[ "$foreground" != 1 ]]; then
  echo "# follow with: tpu/logs.sh --name $TPU_NAME --zone $TPU_ZONE --follow" >&2
fi
