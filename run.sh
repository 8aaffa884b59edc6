#!/usr/bin/env bash
# Set up the project's environment (once; cached in .venv) and run the main job or the tests.
#   ./run.sh main    the main job on an embedded local Ray: the pipeline so far on real example CT
#   ./run.sh test    lint and the test suite
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
  done
fi
"$python" -c 'import sys; assert sys.version_info >= (3, 10), "voldit needs Python 3.10 or newer"'

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
# Set TORCH_SPEC (e.g. "torch==2.11.0") to install another build.
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=".venv/.installed-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (first run only)..."
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "$torch_spec"
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

case "${1:-}" in
  test)
    shift
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/python -m pytest -q "$@"
    ;;
  main)
    shift
    .venv/bin/voldit config validate configs/stage1/*.yaml configs/transformer/*.yaml configs/tgca/*.yaml configs/tiny/*.yaml
    echo "== the paper's largest model: configs/transformer/dit_ds8_l4.yaml"
    .venv/bin/voldit info configs/transformer/dit_ds8_l4.yaml
    echo "== the pipeline on real CT (tiny configs, local Ray)"
    .venv/bin/voldit demo --output outputs/demo "$@"
    ;;
  *)
    echo "usage: ./run.sh main | test [pytest args]" >&2
    exit 2
    ;;
esac
