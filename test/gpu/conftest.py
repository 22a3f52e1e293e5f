"""GPU-only kernel tests; every test here skips cleanly without CUDA.

When there is no GPU, ``TRITON_INTERPRET=1`` is still set here (as in ``test/kernels``) so that
importing ``harli_kernels`` while collecting this directory (collected before test/kernels)
decorates the kernels for the interpreter and the CPU kernel tests of the same session work.
"""

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
