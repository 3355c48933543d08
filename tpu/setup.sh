#!/usr/bin/env bash
# Install embedjax on every worker of the slice, once (re-running is a no-op unless --force).
#
#   tpu/setup.sh --name st5 --repo https://github.com/ORG/embedjax --ref v0.1.0
#   tpu/setup.sh --name st5 --wheel dist/embedjax-0.1.0-py3-none-any.whl
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF_HELP'
Usage: tpu/setup.sh [options] (--repo URL [--ref REF] | --wheel FILE)

On every worker (--worker=all): installs uv, creates ~/embedjax-venv (Python 3.11) and installs embedjax with the tpu and data extras
(jax[tpu], TFDS, seqio) from a git ref or from a wheel copied from here. A marker file per source makes a second
run a no-op, so it is safe to repeat after a partial failure or preemption.

Options:
  --repo URL            git repository to install from [EMBEDJAX_REPO]
  --ref REF             branch, tag or commit [EMBEDJAX_REF, main]
  --wheel FILE          install this wheel instead (copied to every worker)
  --constraints FILE    pip constraints file to copy and apply (e.g. constraints.txt) [none]
  --python-version V    Python for the workers' venv, installed by uv [3.11]
  --force               reinstall even if this source was installed before
EOF_HELP
  common_help
}

repo="${EMBEDJAX_REPO:-}"
ref="${EMBEDJAX_REF:-main}"
wheel=""
constraints=""
python="python3"
python_version="3.11"
force=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --repo) repo="${2:?--repo needs a value}"; shift 2 ;;
    --repo=*) repo="${1#*=}"; shift ;;
    --ref) ref="${2:?--ref needs a value}"; shift 2 ;;
    --ref=*) ref="${1#*=}"; shift ;;
    --wheel) wheel="${2:?--wheel needs a value}"; shift 2 ;;
    --wheel=*) wheel="${1#*=}"; shift ;;
    --constraints) constraints="${2:?--constraints needs a value}"; shift 2 ;;
    --constraints=*) constraints="${1#*=}"; shift ;;
    --python-version) python_version="${2:?--python-version needs a value}"; shift 2 ;;
    --python-version=*) python_version="${1#*=}"; shift ;;
    --force) force=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
if [[ -n "$wheel" && -n "$repo" ]]; then
  die "give --repo or --wheel, not both"
fi
if [[ -z "$wheel" && -z "$repo" ]]; then
  die "give --repo URL (with --ref) or --wheel FILE"
fi
if [[ -n "$wheel" && "$TPU_DRY_RUN" != 1 && ! -f "$wheel" ]]; then
  die "--wheel $wheel: no such file"
fi
if [[ -n "$constraints" && "$TPU_DRY_RUN" != 1 && ! -f "$constraints" ]]; then
  die "--constraints $constraints: no such file"
fi

pip_c=""
if [[ -n "$constraints" ]]; then
  scp_workers all "$constraints" "$TPU_NAME:embedjax-constraints.txt"
  pip_c="-c \$HOME/embedjax-constraints.txt "
fi
if [[ -n "$wheel" ]]; then
  scp_workers all "$wheel" "$TPU_NAME:"
  whl="$(basename "$wheel")"
  spec="\$HOME/${whl}[tpu,data]"
  key="$whl"
else
  spec="embedjax[tpu,data] @ git+$repo@$ref"
  key="$ref"
fi
marker="\$HOME/.embedjax-setup-${key//[^A-Za-z0-9._-]/_}"
if [[ "$force" == 1 ]]; then
  check=""
else
  check="if [ -f $marker ]; then echo \"\$(hostname): embedjax already set up from $key\"; exit 0; fi; "
fi
# TPU VM images ship Python 3.10; embedjax needs >= 3.11, so uv provides the interpreter and the venv.
uv="\$HOME/.local/bin/uv"
remote="set -e; ${check}$python -m pip install -q --user uv && $uv venv -q --python $python_version $REMOTE_VENV && "
remote+="$uv pip install -q --python $REMOTE_VENV/bin/python ${pip_c}\"$spec\" && touch $marker && "
remote+="$REMOTE_VENV/bin/python -c 'import jax, embedjax, libtpu; print(\"embedjax\", embedjax.__version__, \"jax\", jax.__version__)'"
# (no device query here: on a pod, initialising the TPU runtime waits for every worker)
ssh_workers all "$remote"
