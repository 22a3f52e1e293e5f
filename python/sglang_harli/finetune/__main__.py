"""``python -m sglang_harli.finetune``: the fine-tuning CLI (``sglang_harli/cli.py``)."""

import sys

from sglang_harli.cli import main

sys.exit(main())
