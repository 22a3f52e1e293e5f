"""Fine-tuning datasets in the serving process: the served tokenizer's copies, and each
uploaded dataset tokenized once, at upload, kept beside its file for job creation.

A ``purpose=fine-tune`` upload is checked line by line with the served tokenizer as it is read
from its temporary file (``finetune.data.read_jsonl``: streamed, a bounded number of errors).
What the check produced, the examples as flat arrays, is written next to the stored file
(``files/<file id>.tokens.npz``, atomically) with the tokenizer's identity. Creating a job
reads only the lengths from it and copies it to the job's ``train.npz``: nothing is tokenized
twice. A file without one (uploaded by an older version, or whose cache could not be written,
or checked with another tokenizer) is tokenized again at each job's creation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sglang_harli import durable
from sglang_harli.finetune.data import DatasetError, TokenizedDataset, read_jsonl
from sglang_harli.jobs import hyperparameters as hp
from sglang_harli.srt.api_errors import ApiError, busy

logger = logging.getLogger(__name__)

# Datasets tokenized at once, each with its own copy of the served tokenizer. Two: one big
# upload does not hold a small one up (they used to share one copy behind one lock: a small
# upload waited 32 s behind a slow one), and at most two worker threads and two copies are
# busy with datasets, whatever the number of clients. A third gets 503 at once with
# Retry-After: the work ahead of it is of unknown length, and a queued request would hold its
# socket and its uploaded file meanwhile.
TOKENIZING_AT_ONCE = 2
CACHE_SUFFIX = ".tokens.npz"


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the main process knows of the model it serves, for validating jobs."""

    name: str
    limits: hp.ServingLimits


def served_model(limits: hp.ServingLimits) -> ServedModel:
    from sglang.srt.entrypoints.http_server import get_global_state

    manager = get_global_state().tokenizer_manager
    limits = dataclasses.replace(limits, max_seq_length=manager.context_len)
    return ServedModel(manager.served_model_name, limits)


class Tokenizers:
    """Up to :data:`TOKENIZING_AT_ONCE` copies of the served tokenizer, lent one per dataset.

    Our own copies: the HTTP loop keeps SGLang's, and a fast tokenizer used from two threads at
    once can raise "Already borrowed"."""

    def __init__(self, size: int = TOKENIZING_AT_ONCE, served: Any = None):
        self._free: list[Any] = []
        self._made = 0
        self._size = size
        self._lock = threading.Lock()
        self._served = served  # tests hand one in; the server's is SGLang's
        self._identity: str | None = None

    def _source(self) -> Any:
        if self._served is None:
            from sglang.srt.entrypoints.http_server import get_global_state

            served = get_global_state().tokenizer_manager.tokenizer
            if served is None:
                raise ApiError(
                    400,
                    "fine-tuning needs the served tokenizer; this server runs with "
                    "--skip-tokenizer-init",
                    code="unsupported",
                )
            self._served = served
        return self._served

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        """A copy for this thread alone; a 503 (Retry-After) if all are lent."""
        with self._lock:
            if self._free:
                tokenizer = self._free.pop()
            elif self._made < self._size:
                self._made += 1
                tokenizer = None
            else:
                raise busy(
                    f"{self._size} datasets are being checked already; try again shortly",
                    code="server_busy",
                )
        try:
            if tokenizer is None:
                tokenizer = copy.deepcopy(self._source())
        except BaseException:
            with self._lock:
                self._made -= 1
            raise
        try:
            yield tokenizer
        finally:
            with self._lock:
                self._free.append(tokenizer)

    def identity(self) -> str:
        """What a cached dataset must have been tokenized with to be used as it is."""
        if self._identity is None:
            self._identity = tokenizer_identity(self._source())
        return self._identity


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of all that decides a dataset's tokens: vocabulary and rules, chat template,
    special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [
        str(getattr(tokenizer, "chat_template", None)),
        str(tokenizer.eos_token_id),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    digest.update("\0".join(extra).encode())
    return digest.hexdigest()[:32]


def tokenize_file(
    tokenizers: Tokenizers, path: Path, max_length: int, source: str, param: str
) -> TokenizedDataset:
    """Every line of the JSONL file at ``path``, tokenized; any bad line is a 400 naming it."""
    try:
        with tokenizers.borrow() as tokenizer:
            return read_jsonl(path, tokenizer, max_length, source)
    except DatasetError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_file") from None


# --- the cache beside a stored file ----------------------------------------------------------


def cache_path(files_dir: Path, file_id: str) -> Path:
    return files_dir / f"{file_id}{CACHE_SUFFIX}"


def save_cache(path: Path, dataset: TokenizedDataset, identity: str) -> bool:
    """Write the cache; False (logged) if it cannot be: it only saves work later."""
    try:
        dataset.save(path, tokenizer=np.array(identity))
        return True
    except Exception:  # noqa: BLE001 - a full disk: the file is stored, job creation re-reads it
        logger.exception("cannot write the tokenized cache %s", path.name)
        return False


@dataclasses.dataclass(frozen=True)
class JobDataset:
    """What creating a job needs of a file's examples: their lengths and lines (for checks
    against its max_seq_length), and a way to write them as the job's dataset."""

    lengths: np.ndarray
    lines: np.ndarray
    cached: Path | None = None  # the cache to copy, if there is one
    tokenized: TokenizedDataset | None = None  # else the examples themselves

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return int(self.lengths.max(initial=0))

    @classmethod
    def of(cls, dataset: TokenizedDataset) -> JobDataset:
        offsets = np.frombuffer(dataset.offsets, dtype=np.int64)
        lines = np.frombuffer(dataset.lines, dtype=np.int64)
        return cls(np.diff(offsets), lines, tokenized=dataset)

    def write(self, destination: Path) -> None:
        """The job's ``train.npz`` / ``validation.npz`` (``finetune.data.load_examples``)."""
        if self.cached is not None:
            with open(self.cached, "rb") as src:
                durable.write_file(destination, lambda out: shutil.copyfileobj(src, out))
        else:
            assert self.tokenized is not None
            self.tokenized.save(destination)


def load_cache(path: Path, identity: str) -> JobDataset | None:
    """The lengths and lines of a cache tokenized with ``identity``; None if there is none."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "tokenizer" not in data.files or str(data["tokenizer"]) != identity:
                return None
            offsets, lines = data["offsets"], data["lines"]
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged cache is only a lost shortcut
        logger.warning("ignoring the unreadable tokenized cache %s", path.name, exc_info=True)
        return None
    return JobDataset(np.diff(offsets), lines, cached=path)
