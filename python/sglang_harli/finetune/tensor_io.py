"""Tensor files written without holding the GIL for long.

Checkpoints are written on the job agent's thread, in the scheduler's process. ``torch.save``
and ``safetensors.torch.save_file`` serialize in C while holding the GIL, so every decode op that
gives the GIL up between torch calls waits for them: on the 2-core dev machine a tiny model's
decode iterations took up to 2.4x their median while a job checkpointed
(``docs/benchmarks.md``). The writers here do the same work in Python-sized pieces: the header is
built in Python, and each tensor's bytes go to the file through ``write(memoryview)``, which
releases the GIL for the copy into the kernel; between two tensors the GIL changes hands.

- :func:`encode_safetensors` prepares the standard safetensors format (what ``load_file``, PEFT
  and SGLang read); :meth:`Encoded.save` writes it.
- The ``encoding_*`` generators do that torch and Python part a tensor per step (a checkpoint's
  work units on the scheduler thread, inside their budget), so the agent's thread is left with
  I/O, which releases the GIL.
- :func:`encoding_tree` (then :meth:`EncodedTree.save`) and :func:`load_tree` store a nested
  structure (dicts, lists, numbers, strings, tensors) as a safetensors file of its tensors plus
  a small ``torch.save`` of the structure, each tensor a ``{"__tensor__": key}`` placeholder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors.torch import load_file

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_PLACEHOLDER = "__tensor__"
T = TypeVar("T")


@dataclasses.dataclass
class Encoded:
    """A safetensors file as bytes ready to write: the header, then each tensor's data."""

    chunks: list[Any]  # bytes and uint8 numpy views

    def write(self, f: BinaryIO) -> None:
        for chunk in self.chunks:
            f.write(memoryview(chunk))

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            self.write(f)


def drain(steps: Generator[None, None, T]) -> T:
    """Run an ``encoding_*`` generator to its end; its result."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


def encode_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Encoded:
    """The torch and Python work of writing a safetensors file (CPU tensors are viewed, not
    copied), so that writing it is I/O alone."""
    return drain(encoding_safetensors(tensors, metadata))


def encoding_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Generator[None, None, Encoded]:
    """:func:`encode_safetensors` a tensor per step (a server spreads them over work units)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot store {t.dtype} in safetensors")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        views.append(data)
        offset += data.nbytes
        yield
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    return Encoded([struct.pack("<Q", len(encoded)) + encoded, *views])


@dataclasses.dataclass
class EncodedTree:
    """:func:`encoding_tree`'s result: the structure's pickle and the tensors' file."""

    structure: bytes
    tensors: Encoded

    def save(self, structure_path: str | Path, tensors_path: str | Path) -> None:
        self.tensors.save(tensors_path)
        Path(structure_path).write_bytes(self.structure)


def encoding_tree(tree: Any) -> Generator[None, None, EncodedTree]:
    """The torch and Python work of storing ``tree``: its tensors go to a safetensors file, the
    rest to a ``torch.save`` pickle with placeholders; a tensor per step."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {_PLACEHOLDER: key}
        if isinstance(value, dict):
            return {k: strip(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(strip(v, f"{key}.{i}") for i, v in enumerate(value))
        return value

    structure = strip(tree, "t")
    pickled = io.BytesIO()
    torch.save(structure, pickled)
    encoded = yield from encoding_safetensors(tensors)
    return EncodedTree(pickled.getvalue(), encoded)


def load_tree(
    structure_path: str | Path, tensors_path: str | Path, device: torch.device | str = "cpu"
) -> Any:
    """What :meth:`EncodedTree.save` wrote. A structure saved with its tensors inline (no tensors
    file: an older checkpoint) is returned as it is."""
    structure = torch.load(structure_path, map_location=device, weights_only=True)
    if not Path(tensors_path).exists():
        return structure
    tensors = load_file(str(tensors_path), device=str(device))

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_PLACEHOLDER}:
                return tensors[value[_PLACEHOLDER]]
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(fill(v) for v in value)
        return value

    return fill(structure)
