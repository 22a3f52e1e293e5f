"""Choosing the ops backend: validation, and the torch path never touching the kernels or Triton.

The Triton backend's numerics are checked in test/kernels/test_engine_kernels.py (interpreter).
"""

import subprocess
import sys

import pytest

from sglang_harli.config import Kernels
from sglang_harli.finetune import LoraConfig, TrainConfig, Trainer, make_ops
from sglang_harli.finetune.ops import TorchOps
from sglang_harli.jobs.runner import RunnerConfig

from .helpers import load_hf, random_examples, view_and_adapters


def test_kernels_is_the_enum_of_the_flag():
    """One definition of the backends: the configs hold ``config.Kernels`` (a string is taken
    and becomes the enum), and ``auto`` (resolved at start-up) is not a backend."""
    assert TrainConfig().kernels is Kernels.TORCH
    assert TrainConfig(kernels="triton").kernels is Kernels.TRITON
    assert RunnerConfig(kernels=Kernels.TRITON).kernels is Kernels.TRITON
    with pytest.raises(ValueError, match="kernels 'auto': choose one of"):
        TrainConfig(kernels=Kernels.AUTO)


def test_unknown_backend_and_bad_num_sms_raise(monkeypatch):
    with pytest.raises(
        ValueError, match=r"kernels 'cuda-magic': choose one of \('torch', 'triton'\)"
    ):
        make_ops("cuda-magic")
    with pytest.raises(ValueError, match="kernels"):
        TrainConfig(kernels="cuda-magic")
    for bad in (0, -2, True, 2.5, "8"):
        with pytest.raises(ValueError, match="num_sms"):
            make_ops("torch", bad)
        with pytest.raises(ValueError, match="num_sms"):
            TrainConfig(num_sms=bad)
    # On a CPU without Triton's interpreter the kernels cannot run: refused up front.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA"):
        make_ops("triton", 4, device="cpu")
    assert isinstance(make_ops("torch", None, device="cpu"), TorchOps)


def test_torch_backend_never_imports_the_kernels(model_dirs, monkeypatch):
    # None in sys.modules makes any `import harli_kernels` raise, even if it was imported before
    # (ops.py took its Triton-free harli_kernels.launch when it was imported).
    monkeypatch.setitem(sys.modules, "harli_kernels", None)
    with pytest.raises(ImportError, match="kernels='triton' needs"):
        make_ops("triton", 2, device="cuda")  # the one place that imports it
    view, adapters = view_and_adapters(load_hf(model_dirs["llama"]), LoraConfig(r=2))
    data = random_examples(2, view.config.vocab_size)
    trainer = Trainer(view, adapters, data, TrainConfig(global_batch_size=2, micro_batch_size=1))
    trainer.set_num_sms(3)  # accepted and ignored by the torch backend
    assert trainer.ops.name == "torch" and trainer.num_sms == 3
    assert trainer.run_step().loss > 0

    # ...and importing the package and running the torch ops imports no kernel, no Triton and
    # no SGLang, only the Triton-free harli_kernels.launch: a fresh interpreter.
    code = (
        "import sys, torch, sglang_harli.finetune as f; from sglang_harli.finetune import ops; "
        "o = ops.TorchOps(8); x = torch.randn(3, 8, requires_grad=True); "
        "o.swiglu(o.rms_norm(x, torch.ones(8), 1e-6), x).sum().backward(); "
        "f.make_ops('torch', None); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('harli_kernels', 'triton', 'sglang')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['harli_kernels', 'harli_kernels.launch']", out.stdout


def test_set_num_sms_validates(model_dirs):
    view, adapters = view_and_adapters(load_hf(model_dirs["llama"]), LoraConfig(r=2))
    trainer = Trainer(view, adapters, random_examples(1, 100), TrainConfig(num_sms=5))
    assert trainer.num_sms == 5
    trainer.set_num_sms(None)
    assert trainer.num_sms is None
    with pytest.raises(ValueError, match="num_sms"):
        trainer.set_num_sms(0)
