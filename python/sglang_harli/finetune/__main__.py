"""``python -m sglang_harli.finetune``: the fine-tuning CLI (``sglang_harli/finetune_cli.py``)."""

import sys

from sglang_harli.finetune_cli import main

sys.exit(main())
