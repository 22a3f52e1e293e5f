"""Compile every kernel launch of the public ops for real NVIDIA targets, without a GPU.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (``test_codegen.py`` does that)::

    python test/kernels/codegen_check.py [--arch 90 --arch 80] [--quick]

Every public op (forward and backward) is executed on CPU tensors with each Triton kernel
replaced by a recorder, so the exact arguments, constexprs and launch options chosen for a GPU
are captured; each distinct launch is then compiled with ``triton.compile`` (TTIR -> PTX ->
cubin with the bundled ptxas) for the requested architectures.  This checks the GPU code path
of the kernels (type checking, ``tl.dot`` shapes, layouts, shared-memory budget) on the
installed Triton version, which the interpreter does not.  It does not check numerics.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from harli_kernels.launch import interpreting  # Triton-free: Triton is not imported yet

if interpreting():
    sys.exit("codegen_check must run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# max dynamic shared memory per CTA (opt-in): A100 163 KiB, H100/H200 227 KiB
_SMEM_LIMIT = {80: 166912, 90: 232448}
MODULES = ["matmul", "lora", "norm", "activation", "rope", "cross_entropy", "attention"]
_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


class _Recorder:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.name, self.kernel, args, kwargs))

        return record


def _cpu_ok(*named):
    return torch.device("cpu")


def _install_recorders(launches):
    mods = {m: importlib.import_module(f"harli_kernels.{m}") for m in MODULES}
    for mod in mods.values():
        if hasattr(mod, "check_device"):
            mod.check_device = _cpu_ok
        for attr, val in list(vars(mod).items()):
            if isinstance(val, triton.runtime.jit.JITFunction) and attr.endswith("_kernel"):
                setattr(mod, attr, _Recorder(f"{mod.__name__}.{attr}", val, launches))
    return mods


def _exercise(quick: bool):
    """Call every public op forward + backward with GPU-sized configs."""
    import harli_kernels as hk
    from sglang_harli.finetune.base_model import RopeConfig
    from sglang_harli.finetune.graph import rope_inv_freq
    from sglang_harli.finetune.ops import rope_position_tables

    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]

    def leaf(*shape, dtype):
        return torch.randn(*shape, dtype=dtype).requires_grad_(True)

    for dt in dtypes:
        x = leaf(300, 512, dtype=dt)
        w = torch.randn(384, 512, dtype=dt)
        hk.linear(x, w.requires_grad_(True), 66).float().sum().backward()
        w.requires_grad_(False)
        for adt in {dt, torch.float32}:
            a = leaf(16, 512, dtype=adt)
            b = leaf(384, 16, dtype=adt)
            hk.lora_linear(x, w, a, b, 2.0, 66).float().sum().backward()
        mask = (torch.rand(300, 512) > 0.1).to(dt) / 0.9
        hk.lora_linear(x, w, a, b, 2.0, 66, dropout_mask=mask).float().sum().backward()
        hk.rms_norm(
            leaf(7, 4096, dtype=dt), leaf(4096, dtype=dt), 1e-5, 16
        ).float().sum().backward()
        hk.swiglu(leaf(7, 1000, dtype=dt), leaf(7, 1000, dtype=dt), 16).float().sum().backward()
        cos, sin = rope_position_tables(64, rope_inv_freq(RopeConfig(), 128))
        pos = torch.arange(9) % 64
        hk.apply_rope(leaf(9, 8, 128, dtype=dt), pos, cos, sin, 16).float().sum().backward()
        h = leaf(70, 256, dtype=dt)
        lab = torch.randint(0, 1000, (70,))
        hk.fused_linear_cross_entropy(h, torch.randn(1000, 256, dtype=dt), lab, 33, 512).backward()
        cu = torch.tensor([0, 5, 40], dtype=torch.int32)
        for d in (64, 128) if not quick else (128,):
            q, k, v = leaf(40, 4, d, dtype=dt), leaf(40, 2, d, dtype=dt), leaf(40, 2, d, dtype=dt)
            o = hk.causal_attention_varlen(q, k, v, cu, 66, max_seqlen=35)
            o.float().sum().backward()


def _signature(kernel, args, kwargs):
    names = kernel.arg_names
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    const_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs = {}, {}
    for name in names:
        val = values[name]
        if name in const_names:
            signature[name] = "constexpr"
            constexprs[name] = val
        elif isinstance(val, torch.Tensor):
            signature[name] = _PTR[val.dtype]
        elif isinstance(val, bool):
            signature[name] = "i1"
        elif isinstance(val, int):
            signature[name] = "i32" if -(2**31) <= val < 2**31 else "i64"
        elif isinstance(val, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={val!r}")
    return signature, constexprs, options


def _key(name, signature, constexprs, options):
    def norm(v):
        return str(v) if isinstance(v, tl.dtype) else v

    consts = tuple(sorted((k, norm(v)) for k, v in constexprs.items()))
    return (name, tuple(sorted(signature.items())), consts, tuple(sorted(options.items())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="bf16 only, fewer variants")
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]
    launches = []
    _install_recorders(launches)
    _exercise(args.quick)
    seen = {}
    for name, kernel, a, kw in launches:
        signature, constexprs, options = _signature(kernel, a, kw)
        seen.setdefault(
            _key(name, signature, constexprs, options),
            (name, kernel, signature, constexprs, options),
        )
    failures = 0
    print(f"triton {triton.__version__}: {len(seen)} distinct launches, archs {archs}")
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, signature, constexprs, options in seen.values():
            t0 = time.time()
            try:
                src = ASTSource(kernel, signature, constexprs)
                compiled = triton.compile(src, target=target, options=dict(options))
                smem = compiled.metadata.shared
                limit = _SMEM_LIMIT.get(arch)
                if limit is not None and smem > limit:
                    raise RuntimeError(f"needs {smem} B of shared memory > {limit} B on sm_{arch}")
                status = f"ok  smem={smem}"
            except Exception as exc:  # noqa: BLE001
                failures += 1
                status = f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            consts = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()}
            print(f"sm_{arch} {name} {consts} {options}: {status} ({time.time() - t0:.1f}s)")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
