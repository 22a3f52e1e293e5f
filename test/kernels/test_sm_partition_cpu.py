"""SM partitions on a machine without green contexts (CPU CI) + package hygiene."""

import ast
import logging
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import harli_kernels
from harli_kernels import sm_partition
from harli_kernels._grid import check_device, num_programs
from harli_kernels.launch import check_num_sms
from harli_kernels.sm_partition import (
    PERSISTENT_GRIDS_ONLY,
    SMPartitionLadder,
    green_contexts_available,
    sm_granularity,
)

PKG_DIR = pathlib.Path(harli_kernels.__file__).parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")


@no_cuda
def test_green_contexts_report_unavailable():
    ok, reason = green_contexts_available()
    assert ok is False
    assert "CUDA is not available" in reason


@no_cuda
def test_ladder_falls_back_to_persistent_grids_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(sm_partition, "_unavailable_logged", False)
    with caplog.at_level(logging.WARNING, logger="harli_kernels.sm_partition"):
        ladder = SMPartitionLadder([16, 8, 33, 66, 16])
        SMPartitionLadder([4])
    msgs = [r.getMessage() for r in caplog.records if "green contexts unavailable" in r.message]
    assert len(msgs) == 1, msgs
    assert "persistent grids only" in msgs[0]
    assert ladder.available is False and ladder.mode == PERSISTENT_GRIDS_ONLY
    assert [s.requested for s in ladder.shares] == [8, 16, 33, 66]
    assert [s.num_sms for s in ladder.shares] == [8, 16, 33, 66]
    assert all(s.stream is None and not s.green for s in ladder.shares)
    share = ladder.select(20)
    assert share.num_sms == 20 and share.stream is None
    assert "persistent-grids-only" in repr(ladder)
    ladder.close()
    ladder.close()  # idempotent


def test_ladder_disabled_does_not_log(monkeypatch, caplog):
    monkeypatch.setattr(sm_partition, "_unavailable_logged", False)
    with caplog.at_level(logging.WARNING, logger="harli_kernels.sm_partition"):
        with SMPartitionLadder([8], use_green_contexts=False) as ladder:
            assert ladder.mode == PERSISTENT_GRIDS_ONLY
            assert ladder.select(8).stream is None
    assert not [r for r in caplog.records if "unavailable" in r.message]


def test_ladder_bad_arguments():
    with pytest.raises(ValueError, match="shares"):
        SMPartitionLadder([], use_green_contexts=False)
    with pytest.raises(ValueError, match="shares"):
        SMPartitionLadder([0, 8], use_green_contexts=False)
    ladder = SMPartitionLadder([8], use_green_contexts=False)
    with pytest.raises(ValueError, match="num_sms"):
        ladder.select(0)


def test_sm_granularity():
    assert sm_granularity((9, 0)) == (8, 8)
    assert sm_granularity((10, 0)) == (8, 8)
    assert sm_granularity((8, 0)) == (4, 2)
    assert sm_granularity((7, 5)) == (2, 2)
    res = SimpleNamespace(sm=SimpleNamespace(minSmPartitionSize=4, smCoscheduledAlignment=2))
    assert sm_granularity((9, 0), res) == (4, 2)
    empty = SimpleNamespace(sm=SimpleNamespace(minSmPartitionSize=0, smCoscheduledAlignment=0))
    assert sm_granularity((9, 0), empty) == (8, 8)


def test_round_respects_granularity():
    ladder = SMPartitionLadder([8], use_green_contexts=False)
    ladder.total_sms, ladder.granularity = 132, (8, 8)
    assert [ladder._round(n) for n in (1, 8, 16, 33, 66, 132, 500)] == [8, 8, 16, 32, 64, 128, 128]
    ladder.granularity = (4, 2)
    assert [ladder._round(n) for n in (1, 5, 33)] == [4, 4, 32]


def test_num_sms_validation_and_grid():
    assert check_num_sms(3) == 3
    import numpy as np

    assert check_num_sms(np.int64(2)) == 2
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match="num_sms must be an int >= 1"):
            check_num_sms(bad)
    assert check_num_sms(None, allow_none=True) is None
    assert check_num_sms(4, allow_none=True) == 4
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="num_sms must be None or an int >= 1"):
            check_num_sms(bad, allow_none=True)
    assert num_programs(9, 1) == 1
    assert num_programs(9, 3) == 3
    assert num_programs(9, 1000) == 9
    assert num_programs(0, 5) == 1


def test_cpu_tensors_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        check_device(("x", torch.zeros(1)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert check_device(("x", torch.zeros(1))).type == "cpu"


def test_package_never_imports_sglang_statically():
    for path in PKG_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert not name.startswith("sglang"), f"{path.name} imports {name}"


def test_sm_partition_imports_cuda_bindings_lazily():
    tree = ast.parse((PKG_DIR / "sm_partition.py").read_text())
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import | ast.ImportFrom):
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert not (mod or "").startswith("cuda"), f"module-level import of {mod}"


def test_exports_resolve_and_no_submodule_shadows_one():
    # the lazy package: every exported name resolves, and none is also a submodule's name (the
    # import system would rebind the package attribute to the submodule when it is imported)
    submodules = {path.stem for path in PKG_DIR.glob("*.py")}
    for name in harli_kernels.__all__:
        assert name not in submodules, name
        assert callable(getattr(harli_kernels, name)), name
    with pytest.raises(AttributeError):
        harli_kernels.no_such_op  # noqa: B018


def _loaded_after(code: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that a fresh interpreter has loaded after running ``code``."""
    code += f"; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {packages}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return ast.literal_eval(out.stdout.strip())


def test_launch_helpers_import_without_triton_or_torch():
    code = "import harli_kernels, harli_kernels.launch as launch; launch.check_num_sms(3)"
    assert _loaded_after(code, ("triton", "torch")) == []


def test_import_is_sglang_free():
    code = "import harli_kernels as hk; [getattr(hk, name) for name in hk.__all__]"
    assert _loaded_after(code, ("sglang", "sglang_harli")) == []
