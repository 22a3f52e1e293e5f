"""Running SGLang 0.5.23 on a machine with no CUDA driver.

SGLang's CPU engine exists, but the PyPI install is a CUDA-only stack. Four things make it run:

1. ``SGLANG_USE_CPU_ENGINE=1``: the switch behind ``is_cpu()``; without it RoPE falls back to
   vLLM's kernels, which are not installed.
2. An import guard for ``sgl_kernel``: the ``sglang-kernel`` wheel ships only sm90/sm100 CUDA
   builds and its import fails without ``libcuda.so.1``. The guard serves a stand-in whose
   functions raise ``NotImplementedError`` if ever called (none is, on the paths we use), and
   registers no ``torch.ops.sgl_kernel`` ops, so SGLang's AMX paths stay off and no weight is
   repacked behind our back.
3. No pinned host memory: ``pin_memory=True`` needs a CUDA driver (SGLang's LoRA layers ask for
   it). Tensor factories drop the flag and ``Tensor.pin_memory()`` returns the tensor.
4. Intra-op threads: one core fewer than the machine has (``OMP_NUM_THREADS``, unless set).
   The scheduler's OpenMP threads spin at their barriers; when SGLang's HTTP process, its
   detokenizer or the clients take a core they need, a decode iteration waits for a descheduled
   thread: on a 2-core machine with two threads, 1.3% of the tiny model's iterations took over
   twice the median (up to 28 ms against 4.8 ms); with one thread none did in the same load,
   and the median fell to 4.4 ms (``docs/benchmarks.md``).
5. Flags: ``--device cpu``, the ``torch_native`` attention and LoRA backends, a KV pool that
   fits in RAM, the ``cpu_tensor`` retraction backup in PD-decode mode, and ``--dtype float32``
   on a CPU without bfloat16 arithmetic (no AVX-512: oneDNN reports it), each only when the
   user did not give that flag. Without it torch emulates bf16 on such a CPU: a 512x576 by
   576x1536 matmul took 714 ms in bf16 against 5.9 ms in fp32 on a 2-core AVX2 EPYC, and the
   README's demo job 15 minutes instead of about one. fp32 holds the bf16 weights exactly.
6. More than one rank (``--tp-size``, ``--pp-size``, ``--dp-size``): SGLang's CPU engine asks
   for ``SGLANG_CPU_OMP_THREADS_BIND`` (each rank's cores) when there are more ranks than NUMA
   nodes, so each rank gets an equal, contiguous share of this process's cores (and as many
   intra-op threads), unless the user set either; and its model-parallel groups would build a
   PyNccl communicator on the CPU device ("Expected a cuda device"), so on CPU they are made
   without one: collectives go over the gloo groups SGLang builds beside them.

Guards 1-3 must hold in *every* process, and SGLang starts its children with the spawn method
(fresh interpreters). So the launcher exports the engine switch plus ``HARLI_CPU_GUARDS=1`` and
puts ``cpu_boot/`` first on ``PYTHONPATH``: its ``sitecustomize`` installs the guards at
interpreter start, before anything imports SGLang. Nothing here imports SGLang or torch at import
time; on a machine with a GPU none of it is applied.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

GUARD_ENV = "HARLI_CPU_GUARDS"
BOOT_DIR = Path(__file__).resolve().parent / "cpu_boot"

# The KV pool SGLang would size on CPU is ~72% of free RAM (15 GB for a 4 MB model), so we pick
# one: at most this many tokens, and at most 1/8 of available memory.
MAX_DEFAULT_KV_TOKENS = 65536
MIN_DEFAULT_KV_TOKENS = 2048


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- environment and flags ---------------------------------------------------------------------


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which any process (ours or plain SGLang) runs SGLang on CPU."""
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env[GUARD_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", str(intra_op_threads()))
    parts = [str(BOOT_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))  # first, once
    return env


def intra_op_threads() -> int:
    """Torch threads per process on CPU: every core this process may use but one, which is left
    to SGLang's HTTP and detokenizer processes (see the module docstring)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def bf16_arithmetic() -> bool:
    """Whether this CPU computes bfloat16 at fp32-like speed (oneDNN's own test: AVX-512)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given for ``flag`` (last one wins, as in argparse), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def default_kv_tokens(model_path: str | None, available_bytes: int, elem_bytes: int = 2) -> int:
    """A KV-pool size (tokens) that fits comfortably in RAM for this model, its KV cache held
    in ``elem_bytes``-byte numbers."""
    bytes_per_token = _kv_bytes_per_token(model_path, elem_bytes)
    if bytes_per_token is None:
        return MIN_DEFAULT_KV_TOKENS * 8
    fit = available_bytes // 8 // bytes_per_token
    return int(max(MIN_DEFAULT_KV_TOKENS, min(MAX_DEFAULT_KV_TOKENS, fit)))


def _kv_bytes_per_token(model_path: str | None, elem_bytes: int) -> int | None:
    try:
        cfg = json.loads((Path(model_path or "") / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * elem_bytes  # K and V
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def server_flags(argv: Sequence[str]) -> list[str]:
    """SGLang flags a CPU-only run needs, leaving out any the user already gave."""
    wanted = {
        "--device": "cpu",
        "--attention-backend": "torch_native",
        "--lora-backend": "torch_native",
    }
    fp32 = not has_flag(argv, "--dtype") and not bf16_arithmetic()
    if fp32:
        wanted["--dtype"] = "float32"
    elem_bytes = 4 if fp32 or flag_value(argv, "--dtype") == "float32" else 2
    wanted["--max-total-tokens"] = str(
        default_kv_tokens(_model_path(argv), _available_ram(), elem_bytes)
    )
    if flag_value(argv, "--disaggregation-mode") == "decode":
        # the default (host_pool) registers host memory with CUDA
        wanted["--disaggregation-decode-retraction-backup"] = "cpu_tensor"
    extra: list[str] = []
    for flag, value in wanted.items():
        if not has_flag(argv, flag):
            extra += [flag, value]
    return extra


BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"


def ranks_of(argv: Sequence[str]) -> int:
    """How many scheduler processes (ranks) SGLang starts for these flags."""
    ranks = 1
    for flags in (("--tp-size", "--tp"), ("--pp-size", "--pp"), ("--dp-size", "--dp")):
        value = next((v for f in flags if (v := flag_value(argv, f)) is not None), None)
        ranks *= int(value) if value and value.isdigit() else 1
    return ranks


def rank_env(argv: Sequence[str], env: dict[str, str]) -> dict[str, str]:
    """Settings for ``env`` that let SGLang start this many ranks on CPU (guard 6): each rank's
    share of the cores and its intra-op threads, leaving whatever the user set."""
    ranks = ranks_of(argv)
    if ranks <= 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // ranks)
    # with fewer cores than ranks, ranks share cores round-robin
    groups = [cores[(i * share) % len(cores) :][:share] for i in range(ranks)]
    out = {}
    if BIND_ENV not in env:
        out[BIND_ENV] = "|".join(f"{g[0]}-{g[-1]}" for g in groups)
    if env.get("OMP_NUM_THREADS") in (None, str(intra_op_threads())):  # ours, not the user's
        out["OMP_NUM_THREADS"] = str(share)
    return out


def enable() -> None:
    """Make this process and every process it starts from now on run SGLang on CPU."""
    os.environ.update(child_env())
    install_process_guards()


def describe(extra_flags: Sequence[str]) -> str:
    """One line for the log: what running on CPU changed."""
    flags = [f"{extra_flags[i]} {extra_flags[i + 1]}" for i in range(0, len(extra_flags), 2)]
    return ", ".join(
        [
            "SGLANG_USE_CPU_ENGINE=1",
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', intra_op_threads())}",
            "sgl_kernel import guard",
            "no pinned memory",
            *([f"{BIND_ENV}={os.environ[BIND_ENV]}"] if BIND_ENV in os.environ else []),
            *flags,
        ]
    )


# --- per-process guards ------------------------------------------------------------------------


PARALLEL_STATE = "sglang.srt.distributed.parallel_state"


def install_process_guards() -> None:
    """Install the sgl_kernel import guard, the no-pinned-memory patch and the no-PyNccl patch
    in this process."""
    if not any(isinstance(f, _SglKernelGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _SglKernelGuard())
    # Patch a module when (if ever) it is imported: importing torch here would cost ~0.7 GB in
    # processes that never use it, such as multiprocessing's resource tracker.
    for name, patch in (("torch", _drop_pinned_memory), (PARALLEL_STATE, _groups_without_pynccl)):
        if name in sys.modules:
            patch(sys.modules[name])
        elif not any(isinstance(f, _PostImportPatcher) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportPatcher(name, patch))


class _Unavailable:
    """A CUDA-only sgl_kernel function: importable, raises if called."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{self._name} needs the CUDA build of sgl_kernel; "
            "this code path is not supported on a CPU-only machine"
        )

    def __getattr__(self, name: str) -> _Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self._name}.{name}")


class _SglKernelGuard(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``sgl_kernel`` and any ``sgl_kernel.<sub>`` as modules of _Unavailable functions."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+cpu-guard"
        prefix = spec.name.removeprefix("sgl_kernel").lstrip(".")

        def __getattr__(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Unavailable(f"{prefix}.{name}" if prefix else name)

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


class _PostImportPatcher(importlib.abc.MetaPathFinder):
    """Finds module ``name`` the usual way, then patches it right after it has been executed."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _groups_without_pynccl(parallel_state) -> None:
    """SGLang's model-parallel groups, built without a PyNccl communicator unless asked for one
    (guard 6): its constructor takes a CUDA device and fails on the CPU device."""
    if getattr(parallel_state, "_harli_no_pynccl", False):
        return
    original = parallel_state.init_model_parallel_group

    @functools.wraps(original)
    def init_model_parallel_group(*args, **kwargs):
        if kwargs.get("use_pynccl") is None:
            kwargs["use_pynccl"] = False
        return original(*args, **kwargs)

    parallel_state.init_model_parallel_group = init_model_parallel_group
    parallel_state._harli_no_pynccl = True


_FACTORIES = (
    "tensor",
    "as_tensor",
    "empty",
    "empty_strided",
    "empty_like",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "arange",
)


def _drop_pinned_memory(torch) -> None:
    if getattr(torch, "_harli_no_pinned_memory", False):
        return
    for name in _FACTORIES:
        setattr(torch, name, _without_pin_memory(getattr(torch, name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch._harli_no_pinned_memory = True


def _without_pin_memory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


def _model_path(argv: Sequence[str]) -> str | None:
    return flag_value(argv, "--model-path") or flag_value(argv, "--model")
