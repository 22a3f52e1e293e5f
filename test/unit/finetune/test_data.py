"""Datasets: formats, loss masks, and every kind of bad line rejected with its number."""

import copy
import json
import time
import tracemalloc

import pytest
import torch

from sglang_harli.finetune import DatasetError, Example, data, load_jsonl, pack, parse_jsonl_lines
from sglang_harli.finetune.data import check_lengths, decode_lines


def _chat(*turns):
    """user, assistant, user, ... turns as one chat record."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]
    return json.dumps({"messages": messages})


def _trained_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    )


def test_chat_loss_on_assistant_turns_only(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "Name a fruit"},
            {"role": "assistant", "content": "A ripe mango"},
        ]
    }
    (ex,) = parse_jsonl_lines([json.dumps(record)], tokenizer, max_length=128)
    plain = [{k: m[k] for k in ("role", "content")} for m in record["messages"]]
    # The sequence is exactly the chat template's rendering...
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(plain, tokenize=False)
    # ...and only the weighted assistant turn (with its end marker) is trained.
    assert _trained_text(tokenizer, ex) == "A ripe mango<|im_end|>\n"
    assert ex.line == 1


def test_prompt_completion_loss_on_completion_and_eos(tokenizer):
    (ex,) = parse_jsonl_lines(
        [json.dumps({"prompt": "2 + 2 =", "completion": " 4"})], tokenizer, max_length=32
    )
    assert tokenizer.decode(ex.input_ids) == "2 + 2 = 4</s>"
    assert _trained_text(tokenizer, ex) == " 4</s>"
    assert ex.loss_mask[-1] and not ex.loss_mask[0]


def test_every_bad_line_is_rejected_with_its_number(tokenizer, tmp_path):
    good = _chat("What is 1 + 1?", "2")
    lines = [
        good,  # 1
        '{"messages": [',  # 2: not JSON
        "[1, 2]",  # 3: not an object
        json.dumps({"text": "hello"}),  # 4: neither format
        json.dumps({"messages": [{"content": "hi"}]}),  # 5: message without role
        json.dumps({"messages": []}),  # 6: empty
        json.dumps({"messages": [{"role": "user", "content": ""}]}),  # 7: empty content
        _chat("Say a lot", "word " * 300),  # 8: too long
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 9
        "",  # 10: empty line
        json.dumps({"prompt": "Q"}),  # 11: missing completion
        json.dumps({"prompt": "Q", "completion": ""}),  # 12: empty completion
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),  # 13: bad role
        json.dumps({"messages": [{"role": "user", "content": 3}]}),  # 14: content not a string
        good,  # 15
        "",  # trailing blank lines are fine
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    expected = {
        2: "not JSON",
        3: "not a JSON object",
        4: "missing field",
        5: "missing field 'role'",
        6: "empty 'messages'",
        7: "empty content",
        8: "too long",
        9: "no trainable token",
        10: "empty line",
        11: "missing field 'completion'",
        12: "empty 'completion'",
        13: "unknown role",
        14: "must be a string",
    }
    errors = dict(info.value.errors)
    assert set(errors) == set(expected), errors
    for line, problem in expected.items():
        assert problem in errors[line], (line, errors[line])
        assert f"line {line}: " in str(info.value)


def test_empty_dataset_and_good_file(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty dataset"):
        load_jsonl(empty, tokenizer, max_length=64)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join([_chat("a", "b"), _chat("c", "d", "e", "f")]) + "\n")
    examples = load_jsonl(good, tokenizer, max_length=64)
    assert [e.line for e in examples] == [1, 2]
    assert _trained_text(tokenizer, examples[1]) == "d<|im_end|>\nf<|im_end|>\n"


def test_pack_targets_never_cross_sequences():
    a = Example((10, 11, 12, 13), (False, False, True, True))
    b = Example((20, 21, 22), (False, True, True))
    batch = pack([a, b], seeds=[5, 6])
    assert batch.cu_seqlens == (0, 4, 7) and batch.lengths == (4, 3)
    assert batch.positions.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.targets.tolist() == [-100, 12, 13, -100, 21, 22, -100]
    assert batch.num_targets == a.num_targets + b.num_targets == 4
    assert batch.input_ids.dtype == torch.int64 and batch.seeds == (5, 6)


# --- input that used to escape as an exception or split a valid line -----------------------


def test_lines_split_on_newline_only(tokenizer):
    # U+2028/U+2029 (and \x85, \x0c) are characters inside JSON strings, not line breaks
    record = json.dumps(
        {"prompt": "a\u2028b\u2029c\x85d\x0ce", "completion": "f"}, ensure_ascii=False
    )
    content = (record + "\r\n" + record + "\n").encode()
    lines = decode_lines(content)
    assert lines == [record, record, ""]
    assert [e.line for e in parse_jsonl_lines(lines, tokenizer, max_length=64)] == [1, 2]


def test_non_utf8_names_its_line():
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    with pytest.raises(DatasetError) as info:
        decode_lines(good + b"\n" + good + b"\n\xff\xfe oops\n", source="the file")
    assert info.value.errors[0][0] == 3 and "not UTF-8" in info.value.errors[0][1]
    assert str(info.value).startswith("the file: 1 problem(s)")
    assert decode_lines(b"\xef\xbb\xbf" + good) == [good.decode()]  # a byte-order mark is fine


def test_a_chat_template_that_raises_is_that_lines_problem(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('the first message must be a system message') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ok = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    with pytest.raises(DatasetError) as info:
        parse_jsonl_lines([ok, _chat("q", "a"), ok], strict, max_length=64)
    ((line, problem),) = info.value.errors
    assert line == 2 and "the chat template refused it" in problem
    assert "first message must be a system message" in problem


@pytest.mark.parametrize(
    "raw, problem",
    [
        ('{"prompt": 1' + "0" * 5000 + "}", "not JSON we accept"),  # int beyond Python's limit
        ("[" * 100_000 + "]" * 100_000, "not JSON"),  # nested beyond the decoder's recursion
        (json.dumps({"prompt": "\ud800", "completion": "x"}), "cannot be tokenized"),
    ],
)
def test_lines_that_break_the_parser_or_tokenizer_are_refused_by_line(tokenizer, raw, problem):
    good = json.dumps({"prompt": "a", "completion": "b"})
    with pytest.raises(DatasetError) as info:
        parse_jsonl_lines([good, raw], tokenizer, max_length=64)
    ((line, message),) = info.value.errors
    assert line == 2 and problem in message, message


def test_load_jsonl_names_the_file_not_its_path(tokenizer, tmp_path):
    path = tmp_path / "file-abc"
    path.write_text("{not json\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    assert str(info.value).startswith("file-abc: ") and str(tmp_path) not in str(info.value)


def test_check_lengths_names_every_long_example():
    examples = [Example((1, 2, 3), (False, True, True), line=1), Example((1,) * 9, (True,) * 9, 2)]
    check_lengths(examples, 9, "the training file")
    with pytest.raises(DatasetError) as info:
        check_lengths(examples, 5, "the training file")
    assert info.value.errors == [(2, "too long: 9 tokens, more than max_length 5")]


# --- cost: one line is linear in its length, a file is read in bounded memory ---------------

# SmolLM2-135M-Instruct's chat template (the default model's): a default system prompt when the
# chat has none. Written out here: the model itself is a download.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that looks ahead (loop.last), which the one-rendering split cannot follow: such
# chats are checked the quadratic way, up to QUADRATIC_MAX_MESSAGES messages.
LOOKAHEAD_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.last %}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _chats() -> list[list[dict]]:
    sys = {"role": "system", "content": "Answer in one word."}
    pairs = [("What color is the sky?", "Blue."), ("Name a fruit", "A ripe mango"), ("2+2", "4")]
    turns = [m for q, a in pairs for m in ({"role": "user", "content": q},
                                           {"role": "assistant", "content": a})]  # fmt: skip
    unweighted = [dict(m, weight=0) if i == 1 else m for i, m in enumerate(turns)]
    return [
        turns[:2],
        turns,
        [sys, *turns],
        [sys, *unweighted],
        [*turns, {"role": "user", "content": "and then?"}],
        [
            {"role": "user", "content": "héllo wörld 😀 " * 5},
            {"role": "assistant", "content": "ok"},
        ],
        turns * 5,
    ]


def _reference(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """What validation produced before it was linear: every trained turn from two renderings of
    the chat up to it, and a scan of all spans per token."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False)
    trained = [j for j, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    spans = data.spans_by_prefixes(tokenizer, plain, text, trained)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


@pytest.mark.parametrize("template", ["tiny", "smollm2", "lookahead"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_turns_split_in_one_rendering_match_the_quadratic_definition(model_dirs, arch, template):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    if template == "smollm2":
        tokenizer.chat_template = SMOLLM2_TEMPLATE
    elif template == "lookahead":
        tokenizer.chat_template = LOOKAHEAD_TEMPLATE
    for messages in _chats():
        (ex,) = parse_jsonl_lines([json.dumps({"messages": messages})], tokenizer, 4096)
        assert (list(ex.input_ids), list(ex.loss_mask)) == _reference(tokenizer, messages)
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        text = tokenizer.apply_chat_template(plain, tokenize=False)
        trained = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        fast = data._turn_spans(tokenizer, plain, text, trained)
        # the one-rendering split is what ran, except for the template that reads ahead
        assert (fast is None) == (template == "lookahead")


def _long_chat(pairs: int) -> str:
    messages = []
    for t in range(pairs):
        messages += [
            {"role": "user", "content": f"question {t}"},
            {"role": "assistant", "content": f"answer {t}"},
        ]
    return json.dumps({"messages": messages})


def test_a_long_chat_costs_time_linear_in_its_length(tokenizer):
    # 2,000 turn pairs: about 11 s when each assistant turn rendered the chat up to it twice
    line = _long_chat(2000)
    started = time.monotonic()
    (ex,) = parse_jsonl_lines([line], tokenizer, max_length=10**6)
    seconds = time.monotonic() - started
    assert ex.num_targets > 2000 * 3
    assert seconds < 2.0, seconds


def test_a_chat_longer_than_max_length_is_refused_before_it_is_rendered(tokenizer):
    # 4,000 turn pairs (the 300 KB line that took 34 s) against a server's 2,048-token limit
    line = _long_chat(4000)
    started = time.monotonic()
    with pytest.raises(DatasetError) as info:
        parse_jsonl_lines([line], tokenizer, max_length=2048)
    assert time.monotonic() - started < 0.5
    ((number, problem),) = info.value.errors
    assert number == 1 and problem == "too long: 8000 messages, more than max_length 2048"
    # a few long messages: refused on their characters before any rendering or tokenizing
    long = json.dumps({"prompt": "x" * 200_000, "completion": "y"})
    with pytest.raises(DatasetError, match="too long: 200001 characters"):
        parse_jsonl_lines([long], tokenizer, max_length=2048)


def test_a_big_invalid_file_is_read_in_bounded_memory(tokenizer, tmp_path):
    # one 16 MB line, then 100,000 lines that are not JSON: 17 MB that used to be read whole,
    # split, and every line's error kept (about 94 bytes of memory per byte of such a file)
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "' + b"x" * (16 << 20) + b'", "completion": "y"}\n')
        f.write(b"{not json\n" * 100_000)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as info:
            load_jsonl(path, tokenizer, max_length=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # the file is 17 MB
    error = info.value
    assert error.errors[0] == (1, error.errors[0][1]) and "too long" in error.errors[0][1]
    assert len(error.errors) == data.MAX_KEPT_ERRORS and error.total == data.STOP_AFTER_ERRORS
    assert error.stopped_at == data.STOP_AFTER_ERRORS  # it stopped reading early
    assert f"and {data.STOP_AFTER_ERRORS - data.MAX_KEPT_ERRORS} more" in str(error)
