#!/usr/bin/env bash
# Run the whole test suite (lint, then pytest); extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/ruff" check python kernels test scripts
"$VENV/bin/ruff" format --check python kernels test scripts
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected": for this suite that means something is broken, not green
  echo "test.sh: pytest collected no tests" >&2
fi
exit "$rc"
