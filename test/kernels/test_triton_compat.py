"""The kernels must also run on Triton 3.6, the GPU machines' version (CI runs a newer one).

``scripts/setup_env.sh`` installs Triton 3.6.0 beside the venv's own, in ``.venv/triton-3.6``;
this test runs the kernel tests once more in a subprocess that imports that Triton first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TRITON_36 = Path(sys.prefix) / "triton-3.6"
KERNEL_TESTS = Path(__file__).resolve().parent
NESTED = "HARLI_TRITON_COMPAT_RUN"  # set in the subprocess, so it does not recurse


@pytest.mark.skipif(bool(os.environ.get(NESTED)), reason="already the Triton 3.6 run")
@pytest.mark.skipif(
    not (TRITON_36 / "triton").is_dir(),
    reason=f"no Triton 3.6 at {TRITON_36} (scripts/setup_env.sh installs it)",
)
def test_kernel_tests_pass_on_triton_3_6():
    env = {**os.environ, "PYTHONPATH": str(TRITON_36), NESTED: "1"}
    version = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip().startswith("3.6"), version.stdout + version.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(KERNEL_TESTS), "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]
