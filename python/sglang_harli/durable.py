"""Writes that survive a crash: a temporary name, fsync, then an atomic rename.

A reader (or a restarted server) sees either the old state or the whole new file or directory,
never a half-written one. Used for uploads, tokenized datasets, checkpoints and adapters.
Plain ``os``/``pathlib``: the engine, the job store and the API all use these.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"  # temporary names contain this; a restart may delete what is left of them


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories can't sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file ``path`` with what ``write`` writes to the open file."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_file(path, lambda f: f.write(data))


@contextlib.contextmanager
def new_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``path`` whole (replacing an
    earlier ``path``), with every file fsynced first. On failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():  # a directory cannot be renamed over a non-empty one: swap it out
            old = _tmp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Delete temporary files and directories a crash left directly under ``directory``."""
    removed = []
    for child in Path(directory).glob(f"*{TMP_MARK}*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed
