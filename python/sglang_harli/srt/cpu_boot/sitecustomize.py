"""Put first on PYTHONPATH by sglang_harli on CPU-only machines (see sglang_harli/srt/cpu.py).

Python imports ``sitecustomize`` at interpreter start, so every process of the server, including
the ones SGLang spawns, gets the CPU guards before it imports SGLang. It then runs the
``sitecustomize`` it shadows, if there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("HARLI_CPU_GUARDS") == "1":
    from sglang_harli.srt.cpu import install_process_guards

    install_process_guards()

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
)
if _spec is not None and _spec.loader is not None:
    _shadowed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadowed)
