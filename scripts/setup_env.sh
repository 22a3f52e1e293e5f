#!/usr/bin/env bash
# Sourced by serve.sh and test.sh: creates the project's virtual environment at .venv and
# installs the project into it (editable, with test extras). Reused as long as the files that
# decide its contents are unchanged; set HARLI_PYTHON to choose the interpreter (Python 3.11).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PYTHON=${HARLI_PYTHON:-$(command -v python3.11 || command -v python3)}

want=$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)
have=$(cat "$VENV/.harli-stamp" 2>/dev/null || true)
if [ ! -x "$VENV/bin/python" ] || [ "$want" != "$have" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "sglang 0.5.23 wheels need Python 3.11; set HARLI_PYTHON"'
  echo "setting up $VENV (first run installs sglang and torch: several minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
  # The GPU machines run Triton 3.6: the kernel tests also run against it (test_triton_compat)
  "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target "$VENV/triton-3.6" triton==3.6.0 >&2
  echo "$want" > "$VENV/.harli-stamp"
fi
