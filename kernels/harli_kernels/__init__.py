"""Triton finetune kernels on SM-limited persistent grids (issue 5)."""
