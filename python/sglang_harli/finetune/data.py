"""Finetuning datasets: JSONL in OpenAI's chat format or prompt/completion, validated up front.

Every line is checked before any training starts; problems are collected and raised together
in one :class:`DatasetError` that names each line. Accepted records:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``,
  rendered with the tokenizer's chat template; loss on assistant turns only (an assistant
  message with ``"weight": 0`` is context, not a target, as in OpenAI's format);
* prompt/completion: ``{"prompt": "...", "completion": "..."}``; loss on the completion and
  the end-of-sequence token that follows it.

Lines are separated by ``\n`` only (a trailing ``\r`` is dropped): JSON strings may hold U+2028,
U+2029 and other characters that ``str.splitlines`` would split on. Whatever a line makes the
tokenizer or its chat template raise is that line's problem, never an exception of the caller.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized sequence; ``loss_mask[t]`` says whether token t is a training target."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    line: int | None = None  # 1-based line of the source file

    @property
    def num_targets(self) -> int:
        # Token 0 is never predicted: a target needs a token before it.
        return sum(self.loss_mask[1:])


class DatasetError(ValueError):
    """A dataset that cannot be trained on; ``errors`` lists ``(line, problem)``."""

    def __init__(self, source: str, errors: Sequence[tuple[int | None, str]]):
        self.source = source
        self.errors = list(errors)
        shown = "\n".join(
            f"  line {line}: {msg}" if line is not None else f"  {msg}"
            for line, msg in self.errors[:20]
        )
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{source}: {len(self.errors)} problem(s)\n{shown}{more}")


class _Invalid(Exception):
    """One record's problem; becomes a line of a DatasetError."""


def load_jsonl(
    path: str | Path, tokenizer: Any, max_length: int, source: str | None = None
) -> list[Example]:
    """Read, validate and tokenize a JSONL dataset; raises :class:`DatasetError`, which names
    ``source`` (default: the file's name, not its whole path: errors may reach API clients)."""
    source = source or Path(path).name
    lines = decode_lines(Path(path).read_bytes(), source)
    return parse_jsonl_lines(lines, tokenizer, max_length, source=source)


def split_lines(text: str) -> list[str]:
    """JSONL lines: split on ``\n`` only, each without a trailing ``\r``."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def decode_lines(content: bytes, source: str = "<dataset>") -> list[str]:
    """UTF-8 bytes (a leading byte-order mark is allowed) as JSONL lines; raises
    :class:`DatasetError` naming the line of the first byte that is not UTF-8."""
    content = content.removeprefix(codecs.BOM_UTF8)
    try:
        return split_lines(content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        problem = f"not UTF-8 text (byte {exc.start} of the file)"
        raise DatasetError(source, [(line, problem)]) from None


def check_lengths(examples: Sequence[Example], max_length: int, source: str) -> None:
    """Raise :class:`DatasetError` naming every example longer than ``max_length`` tokens
    (for a limit lower than the one the examples were parsed with)."""
    errors = [
        (e.line, f"too long: {len(e.input_ids)} tokens, more than max_length {max_length}")
        for e in examples
        if len(e.input_ids) > max_length
    ]
    if errors:
        raise DatasetError(source, errors)


def parse_jsonl_lines(
    lines: Sequence[str], tokenizer: Any, max_length: int, source: str = "<dataset>"
) -> list[Example]:
    # Blank lines at the very end are a harmless editor habit; anywhere else they are errors.
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    examples, errors = [], []
    for i, raw in enumerate(lines[: last + 1], start=1):
        try:
            examples.append(_parse_line(raw, tokenizer, max_length, i))
        except _Invalid as e:
            errors.append((i, str(e)))
        except Exception as e:  # noqa: BLE001 - the tokenizer or the template failed on it
            errors.append((i, f"cannot be tokenized ({type(e).__name__}: {_short(e)})"))
    if not examples and not errors:
        errors.append((None, "empty dataset: no records"))
    if errors:
        raise DatasetError(source, errors)
    targets = sum(e.num_targets for e in examples)
    logger.info("%s: %d examples, %d target tokens", source, len(examples), targets)
    return examples


def _parse_line(raw: str, tokenizer: Any, max_length: int, line: int) -> Example:
    if not raw.strip():
        raise _Invalid("empty line")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _Invalid(f"not JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of 5000 digits, [[[[...]]]] nested
        raise _Invalid(f"not JSON we accept ({_short(e)})") from None
    if not isinstance(record, dict):
        raise _Invalid(f"not a JSON object but {type(record).__name__}")
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise _Invalid("has both 'messages' and 'prompt'/'completion': which format?")
    if "messages" in record:
        ids, mask = _tokenize_chat(record["messages"], tokenizer)
    elif "prompt" in record or "completion" in record:
        ids, mask = _tokenize_prompt_completion(record, tokenizer)
    else:
        raise _Invalid("missing field: 'messages' (chat) or 'prompt' and 'completion'")
    if len(ids) > max_length:
        raise _Invalid(f"too long: {len(ids)} tokens, more than max_length {max_length}")
    example = Example(tuple(ids), tuple(mask), line)
    if example.num_targets == 0:
        raise _Invalid("no trainable token (no assistant turn or completion after a prompt)")
    return example


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise _Invalid("'messages' must be a list")
    if not messages:
        raise _Invalid("empty 'messages'")
    for j, m in enumerate(messages):
        where = f"message {j}"
        if not isinstance(m, dict):
            raise _Invalid(f"{where} is not an object")
        for key in ("role", "content"):
            if key not in m:
                raise _Invalid(f"{where}: missing field '{key}'")
        if m["role"] not in ROLES:
            raise _Invalid(f"{where}: unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise _Invalid(f"{where}: 'content' must be a string")
        if not m["content"]:
            raise _Invalid(f"{where} ({m['role']}): empty content")
        if m.get("weight", 1) not in (0, 1) or ("weight" in m and m["role"] != "assistant"):
            raise _Invalid(f"{where}: 'weight' must be 0 or 1, on assistant messages only")
    return messages


def _tokenize_chat(messages: Any, tokenizer: Any) -> tuple[list[int], list[bool]]:
    messages = _validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise _Invalid("the tokenizer has no chat template to render 'messages' with")
    # Chat templates take plain {role, content}; 'weight' is ours.
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs: list[dict[str, str]], gen_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen_prompt
            )
        except Exception as exc:  # noqa: BLE001 - templates raise on conversations they refuse
            raise _Invalid(f"the chat template refused it: {_short(exc)}") from None

    text = render(plain)
    spans = []  # character spans of the trained assistant turns (with their end marker)
    for j, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before, upto = render(plain[:j], gen_prompt=True), render(plain[: j + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise _Invalid("the chat template does not render turn by turn (prefix-unstable)")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _tokenize_prompt_completion(record: dict, tokenizer: Any) -> tuple[list[int], list[bool]]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise _Invalid(f"missing field '{key}'")
        if not isinstance(record[key], str):
            raise _Invalid(f"'{key}' must be a string")
        if not record[key]:
            raise _Invalid(f"empty '{key}'")
    prompt = list(tokenizer(record["prompt"])["input_ids"])
    completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# --- tokenized datasets on disk --------------------------------------------------------------
#
# A job's dataset is tokenized once, when the job is created (off the scheduler), and stored as
# flat arrays; a scheduler that starts the job only reads them back (milliseconds for 10k
# examples), so starting a job does not pause decode.


def save_examples(path: str | Path, examples: Sequence[Example]) -> None:
    """Write ``examples`` to ``path`` (``.npz``) atomically."""
    from sglang_harli import durable

    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    arrays = {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "input_ids": np.fromiter(
            (t for e in examples for t in e.input_ids), dtype=np.int64, count=int(lengths.sum())
        ),
        "loss_mask": np.fromiter(
            (m for e in examples for m in e.loss_mask), dtype=np.bool_, count=int(lengths.sum())
        ),
        "lines": np.array([-1 if e.line is None else e.line for e in examples], dtype=np.int64),
    }
    durable.write_file(path, lambda f: np.savez(f, **arrays))


def load_examples(path: str | Path) -> list[Example]:
    """Read what :func:`save_examples` wrote."""
    with np.load(path) as data:
        offsets, ids = data["offsets"].tolist(), data["input_ids"].tolist()
        mask, lines = data["loss_mask"].tolist(), data["lines"].tolist()
    return [
        Example(tuple(ids[a:b]), tuple(mask[a:b]), None if line < 0 else line)
        for a, b, line in zip(offsets[:-1], offsets[1:], lines, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Sequences packed end to end into one row of ``num_tokens`` tokens (no padding).

    ``targets[t]`` is the token to predict at position t, or ``IGNORE_INDEX`` (prompt tokens,
    and the last token of each sequence: targets never cross a sequence boundary).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, restarting at 0 in each sequence
    targets: torch.Tensor  # [T] int64
    cu_seqlens: tuple[int, ...]  # sequence boundaries: 0, len0, len0 + len1, ...
    seeds: tuple[int, ...]  # per sequence: seeds its dropout masks
    num_targets: int

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:], strict=True))


def pack(
    examples: Sequence[Example],
    seeds: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    ids, positions, targets, cu = [], [], [], [0]
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        targets.extend(
            ex.input_ids[t + 1] if ex.loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)
        )
        targets.append(IGNORE_INDEX)
        cu.append(cu[-1] + n)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return PackedBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        targets=tensor(targets),
        cu_seqlens=tuple(cu),
        seeds=tuple(seeds) if seeds is not None else (0,) * len(examples),
        num_targets=sum(ex.num_targets for ex in examples),
    )
