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

A file from a client is bounded work: it is read a line at a time (:func:`read_jsonl`), a line
is refused before it is parsed, rendered or tokenized when ``max_length`` tokens could not hold
it (:class:`LineLimits`), a chat costs a few renderings of its template however many turns it
has (:func:`_turn_spans`), and at most :data:`MAX_KEPT_ERRORS` problems are kept (checking stops
after :data:`STOP_AFTER_ERRORS`).
"""

from __future__ import annotations

import array
import bisect
import codecs
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

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


# A DatasetError lists at most this many problems (the first ones); it counts the others.
MAX_KEPT_ERRORS = 20
# Checking stops after this many problems: a file that bad gets no better further down, and a
# huge one would otherwise be read to its end only to say so.
STOP_AFTER_ERRORS = 100
# A chat whose turn boundaries cannot be read off one rendering (see _turn_spans) is checked
# the old way, two renderings per assistant turn, only up to this many messages: that way costs
# the square of the number of messages.
QUADRATIC_MAX_MESSAGES = 64


class DatasetError(ValueError):
    """A dataset that cannot be trained on; ``errors`` lists ``(line, problem)``, the first
    :data:`MAX_KEPT_ERRORS` of ``total`` problems; ``stopped_at``: the line where checking
    stopped (after :data:`STOP_AFTER_ERRORS` problems), or None if every line was read."""

    def __init__(
        self,
        source: str,
        errors: Sequence[tuple[int | None, str]],
        total: int | None = None,
        stopped_at: int | None = None,
    ):
        self.source = source
        self.errors = list(errors)
        self.total = len(self.errors) if total is None else total
        self.stopped_at = stopped_at
        shown = "\n".join(
            f"  line {line}: {msg}" if line is not None else f"  {msg}"
            for line, msg in self.errors[:MAX_KEPT_ERRORS]
        )
        hidden = self.total - min(len(self.errors), MAX_KEPT_ERRORS)
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        if stopped_at is not None:
            more += f" (checking stopped at line {stopped_at})"
        counted = f"{self.total}{'+' if stopped_at is not None else ''}"
        super().__init__(f"{source}: {counted} problem(s)\n{shown}{more}")


class _Invalid(Exception):
    """One record's problem; becomes a line of a DatasetError."""


@dataclasses.dataclass(frozen=True)
class LineLimits:
    """What a line may cost before it is tokenized, from what ``max_length`` tokens can hold.

    A token covers at most ``token_chars`` characters of text (the longest entry of the
    vocabulary, special tokens included), so a rendered text longer than
    ``max_length * token_chars`` characters is too long whatever its tokens. A message renders
    to at least one token, so there are at most ``max_length`` messages. A JSON line spends at
    most 12 bytes on a character (a ``\\uXXXX`` surrogate pair for one emoji) and some 64 on a
    message's keys and quotes: a longer line cannot fit, and is refused before it is parsed.
    Whitespace padding beyond that is refused too (nobody writes a megabyte of it).
    """

    max_length: int
    token_chars: int

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> LineLimits:
        try:
            longest = max(map(len, tokenizer.get_vocab()), default=1)
        except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: no character limit
            longest = 1 << 20
        return cls(max_length, max(1, longest))

    @property
    def max_chars(self) -> int:
        return self.max_length * self.token_chars

    @property
    def max_line_bytes(self) -> int:
        return self.max_length * (12 * self.token_chars + 64) + 4096

    def check_chars(self, chars: int) -> None:
        if chars > self.max_chars:
            raise _Invalid(
                f"too long: {chars} characters, more than max_length {self.max_length} tokens "
                "can hold"
            )


class Problems:
    """The problems of one dataset, kept within bounds: the first :data:`MAX_KEPT_ERRORS` of
    them, and a count of all."""

    def __init__(self, source: str):
        self.source = source
        self.kept: list[tuple[int | None, str]] = []
        self.total = 0

    def add(self, line: int | None, problem: str, times: int = 1) -> None:
        """``times`` > 1: the same problem on ``times`` lines from ``line`` on."""
        for i in range(min(times, MAX_KEPT_ERRORS - len(self.kept))):
            self.kept.append((None if line is None else line + i, problem))
        self.total += times

    @property
    def enough(self) -> bool:
        return self.total >= STOP_AFTER_ERRORS

    def error(self, stopped_at: int | None = None) -> DatasetError:
        return DatasetError(self.source, self.kept, self.total, stopped_at)


class TokenizedDataset:
    """Examples as flat arrays (8 bytes a token, not a Python int each), filled line by line."""

    def __init__(self) -> None:
        self.input_ids = array.array("q")
        self.loss_mask = array.array("b")
        self.offsets = array.array("q", [0])
        self.lines = array.array("q")
        self.num_targets = 0
        self.longest = 0

    def __len__(self) -> int:
        return len(self.lines)

    def add(self, example: Example) -> None:
        self.input_ids.extend(example.input_ids)
        self.loss_mask.extend(example.loss_mask)
        self.offsets.append(len(self.input_ids))
        self.lines.append(-1 if example.line is None else example.line)
        self.num_targets += example.num_targets
        self.longest = max(self.longest, len(example.input_ids))

    def examples(self) -> list[Example]:
        ids, mask, offsets = self.input_ids, self.loss_mask, self.offsets
        return [
            Example(tuple(ids[a:b]), tuple(map(bool, mask[a:b])), None if line < 0 else line)
            for a, b, line in zip(offsets[:-1], offsets[1:], self.lines, strict=True)
        ]

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write the examples (and ``extra`` arrays) as :func:`save_examples` does, atomically."""
        from sglang_harli import durable

        arrays = {**self.arrays(), **extra}
        durable.write_file(path, lambda f: np.savez(f, **arrays))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "offsets": np.frombuffer(self.offsets, dtype=np.int64),
            "input_ids": np.frombuffer(self.input_ids, dtype=np.int64),
            "loss_mask": np.frombuffer(self.loss_mask, dtype=np.int8).astype(np.bool_),
            "lines": np.frombuffer(self.lines, dtype=np.int64),
        }


def load_jsonl(
    path: str | Path, tokenizer: Any, max_length: int, source: str | None = None
) -> list[Example]:
    """Read, validate and tokenize a JSONL dataset; raises :class:`DatasetError`, which names
    ``source`` (default: the file's name, not its whole path: errors may reach API clients)."""
    return read_jsonl(path, tokenizer, max_length, source).examples()


def read_jsonl(
    path: str | Path, tokenizer: Any, max_length: int, source: str | None = None
) -> TokenizedDataset:
    """:func:`load_jsonl`, streamed: the file is read a line at a time (a line longer than
    ``max_length`` tokens could hold is skipped unread), at most :data:`MAX_KEPT_ERRORS`
    problems are kept and reading stops after :data:`STOP_AFTER_ERRORS`, so the memory it takes
    is about one line's, plus the tokens of the good lines."""
    source = source or Path(path).name
    limits = LineLimits.of(tokenizer, max_length)
    with open(path, "rb") as f:
        return _check_lines(read_lines(f, limits.max_line_bytes), tokenizer, limits, source)


def read_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, str | None, str]]:
    """``(line number, text, problem)`` per JSONL line of the binary file ``f``: ``text`` is
    None when the line is refused unread (``problem`` says why). Lines end at ``\\n`` only (a
    ``\\r`` before it is dropped); a leading byte-order mark is skipped. A line that is not
    UTF-8 ends the file: nothing after it can be told apart reliably."""
    if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
        f.seek(0)
    offset, number = 0, 0  # bytes before the current line (after the mark), its number
    too_long = f"too long: more than {max_line_bytes} bytes, more than max_length can hold"
    while True:
        number += 1
        data = f.readline(max_line_bytes + 2)  # the line and its "\r\n", or more than a line
        size, ended = len(data), data.endswith(b"\n")
        if not ended and size == max_line_bytes + 2:  # skip the rest unread (a MB at a time)
            while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                size += len(more)
            size, ended = size + len(more), bool(more)
            yield number, None, too_long
        else:
            line = data.removesuffix(b"\n").removesuffix(b"\r")
            if len(line) > max_line_bytes:
                yield number, None, too_long
            else:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, None, f"not UTF-8 text (byte {offset + exc.start} of the file)"
                    return
                yield number, text, ""
        offset += size
        if not ended:
            return


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
    check_example_lengths(
        [len(e.input_ids) for e in examples], [e.line for e in examples], max_length, source
    )


def check_example_lengths(
    lengths: Sequence[int], lines: Sequence[int | None], max_length: int, source: str
) -> None:
    """:func:`check_lengths` on the lengths and lines alone (as a stored dataset has them)."""
    problems = Problems(source)
    for n, line in zip(lengths, lines, strict=True):
        if n > max_length:
            problems.add(line, f"too long: {n} tokens, more than max_length {max_length}")
    if problems.total:
        raise problems.error()


def parse_jsonl_lines(
    lines: Sequence[str], tokenizer: Any, max_length: int, source: str = "<dataset>"
) -> list[Example]:
    """Validate and tokenize JSONL lines already split (see :func:`split_lines`)."""
    limits = LineLimits.of(tokenizer, max_length)
    numbered = ((i, line, "") for i, line in enumerate(lines, start=1))
    return _check_lines(numbered, tokenizer, limits, source).examples()


def _check_lines(
    lines: Iterable[tuple[int, str | None, str]], tokenizer: Any, limits: LineLimits, source: str
) -> TokenizedDataset:
    dataset, problems = TokenizedDataset(), Problems(source)
    blank_from, blanks = 0, 0  # a run of blank lines: an error unless the file ends there
    number = 0
    for number, raw, problem in lines:
        if raw is not None and not raw.strip():
            blank_from, blanks = (blank_from if blanks else number), blanks + 1
            continue
        if blanks:  # blank lines at the very end are a harmless editor habit, not in between
            problems.add(blank_from, "empty line", times=blanks)
            blanks = 0
        if raw is None:
            problems.add(number, problem)
        else:
            try:
                dataset.add(_parse_line(raw, tokenizer, limits, number))
            except _Invalid as e:
                problems.add(number, str(e))
            except Exception as e:  # noqa: BLE001 - the tokenizer or the template failed on it
                problems.add(number, f"cannot be tokenized ({type(e).__name__}: {_short(e)})")
        if problems.enough:
            raise problems.error(stopped_at=number)
    if not len(dataset) and not problems.total:
        problems.add(None, "empty dataset: no records")
    if problems.total:
        raise problems.error()
    logger.info("%s: %d examples, %d target tokens", source, len(dataset), dataset.num_targets)
    return dataset


def _parse_line(raw: str, tokenizer: Any, limits: LineLimits, line: int) -> Example:
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
        ids, mask = _tokenize_chat(record["messages"], tokenizer, limits)
    elif "prompt" in record or "completion" in record:
        ids, mask = _tokenize_prompt_completion(record, tokenizer, limits)
    else:
        raise _Invalid("missing field: 'messages' (chat) or 'prompt' and 'completion'")
    if len(ids) > limits.max_length:
        raise _Invalid(f"too long: {len(ids)} tokens, more than max_length {limits.max_length}")
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


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen_prompt
        )
    except Exception as exc:  # noqa: BLE001 - templates raise on conversations they refuse
        raise _Invalid(f"the chat template refused it: {_short(exc)}") from None


def _tokenize_chat(
    messages: Any, tokenizer: Any, limits: LineLimits
) -> tuple[list[int], list[bool]]:
    messages = _validate_messages(messages)
    if len(messages) > limits.max_length:  # each message renders to a token at least
        raise _Invalid(
            f"too long: {len(messages)} messages, more than max_length {limits.max_length}"
        )
    limits.check_chars(sum(len(m["content"]) for m in messages))
    if not getattr(tokenizer, "chat_template", None):
        raise _Invalid("the tokenizer has no chat template to render 'messages' with")
    # Chat templates take plain {role, content}; 'weight' is ours.
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, plain)
    limits.check_chars(len(text))
    trained = [
        j for j, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0
    ]
    spans = _turn_spans(tokenizer, plain, text, trained)
    if spans is None:
        if len(messages) > QUADRATIC_MAX_MESSAGES:
            raise _Invalid(
                f"the chat template cannot be split into turns in one rendering; with it a chat "
                f"may have at most {QUADRATIC_MAX_MESSAGES} messages, this one has {len(messages)}"
            )
        spans = spans_by_prefixes(tokenizer, plain, text, trained)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _mask(enc["offset_mapping"], spans)


def spans_by_prefixes(
    tokenizer: Any, plain: list[dict[str, str]], text: str, trained: Sequence[int]
) -> list[tuple[int, int]]:
    """The character spans of the trained assistant turns (with their end marker), by the
    definition: turn j is what ``messages[:j + 1]`` renders beyond ``messages[:j]`` with its
    generation prompt. Two renderings per turn, each as long as the chat so far: the square of
    the chat's length."""
    spans = []
    for j in trained:
        before, upto = _render(tokenizer, plain[:j], True), _render(tokenizer, plain[: j + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise _Invalid("the chat template does not render turn by turn (prefix-unstable)")
        spans.append((len(before), len(upto)))
    return spans


def _turn_spans(
    tokenizer: Any, plain: list[dict[str, str]], text: str, trained: Sequence[int]
) -> list[tuple[int, int]] | None:
    """:func:`spans_by_prefixes` in a few renderings: the chat is rendered once more with a
    ``messages`` list that notes how much text the template had written when it took each
    message (``starts``), which for a template that renders message by message is where that
    message's turn begins; a turn ends where the next begins. Checked against the definition
    (the renderings of the chat up to the turn, with and without its generation prompt, and up
    to its end) on the first, second and last trained turns (a template that reads ahead, or
    writes something after its loop, fails that check); None where this cannot be done, and
    the caller falls back to the definition."""
    if not trained:
        return []
    starts = _message_starts(tokenizer, plain, text)
    if starts is None:
        return None
    bounds = [*starts, len(text)]
    gen_prompt = None
    for j in sorted({trained[0], trained[min(1, len(trained) - 1)], trained[-1]}):
        before, upto = _render(tokenizer, plain[:j], True), _render(tokenizer, plain[: j + 1])
        if upto != text[: bounds[j + 1]] or _render(tokenizer, plain[:j]) != text[: bounds[j]]:
            return None
        if not before.startswith(text[: bounds[j]]):
            return None
        if gen_prompt is None:
            gen_prompt = before[bounds[j] :]
        elif before[bounds[j] :] != gen_prompt:
            return None
    spans = []
    for j in trained:
        start = bounds[j] + len(gen_prompt)
        if not text.startswith(gen_prompt, bounds[j]) or start > bounds[j + 1]:
            raise _Invalid("the chat template does not render turn by turn (prefix-unstable)")
        spans.append((start, bounds[j + 1]))
    return spans


def _message_starts(tokenizer: Any, plain: list[dict[str, str]], text: str) -> list[int] | None:
    """Where each message's turn begins in ``text``, from one streamed rendering (None: not
    available with this tokenizer, or the template reads its messages more than once)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = tokenizer.get_chat_template()
        compiled = _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - another transformers: the caller uses the definition
        return None
    written, starts = [0], []

    class Noting(list):
        def __iter__(self) -> Iterator[dict[str, str]]:
            for message in super().__iter__():
                starts.append(written[0])
                yield message

    chunks = []
    try:
        stream = compiled.generate(
            messages=Noting(plain),
            tools=None,
            documents=None,
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
        for chunk in stream:
            chunks.append(chunk)
            written[0] += len(chunk)
    except Exception:  # noqa: BLE001 - the template refused it here; _render said so already
        return None
    if "".join(chunks) != text or len(starts) != len(plain) or starts != sorted(starts):
        return None
    return starts


def _mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token begins inside a span: a token at ``start`` does when some span that
    begins at or before it ends after it (one binary search a token, not a scan of spans)."""
    spans = sorted(spans)
    begins = [s for s, _ in spans]
    reach = list(itertools.accumulate((e for _, e in spans), max))  # furthest end so far
    mask = []
    for start, _ in offsets:
        i = bisect.bisect_right(begins, start) - 1
        mask.append(i >= 0 and reach[i] > start)
    return mask


def _tokenize_prompt_completion(
    record: dict, tokenizer: Any, limits: LineLimits
) -> tuple[list[int], list[bool]]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise _Invalid(f"missing field '{key}'")
        if not isinstance(record[key], str):
            raise _Invalid(f"'{key}' must be a string")
        if not record[key]:
            raise _Invalid(f"empty '{key}'")
    limits.check_chars(len(record["prompt"]) + len(record["completion"]))
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
# A dataset is tokenized once, when it is uploaded (off the scheduler), and stored as flat
# arrays, copied to each job that trains on it; a scheduler that starts the job only reads them
# back (milliseconds for 10k examples), so starting a job does not pause decode.


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
