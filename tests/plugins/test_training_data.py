"""Training data: every file format and record kind, every invalid record named, loss masking, splits, `data check`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from jarvis.plugins.chat_formats.families import CHATML, GEMMA, LLAMA3, MISTRAL
from jarvis.plugins.training.data_cli import register
from jarvis.plugins.training.datasets import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    load_records,
    prepare_dataset,
    split_eval,
    tokenize_example,
)

DATA = Path(__file__).parent.parent / "data"
MIXED_INVALID = {
    "line 8": "not valid JSON (Expecting property name enclosed in double quotes at column 26)",
    "line 9": "the line is an array, not an object",
    "no-output": "missing field 'output'",
    "line 11": "'response' is empty",
    "bad-role": "'messages[2].role' is 'wizard' (expected system, user or assistant)",
    "ends-with-user": "'messages' ends with a user turn (the last turn must be the assistant's)",
    "no-user": "'messages' has no user turn",
    "messages-not-list": "'messages' is a string (expected a list of {role, content} objects)",
    "numeric-output": "'output' is a number (expected a string)",
    "unknown-fields": "no recognised fields (expected 'messages', 'instruction' and 'output', "
                      "or 'prompt' and 'response'); found 'question', 'answer'",
    "not-alternating": "cannot be rendered as gemma: Conversation roles must alternate "
                       "user/assistant/user/assistant/...",
    "no-content": "missing field 'messages[1].content'",
}


def user_prompt(content: str, chat_format=GEMMA) -> str:
    return chat_format([{"role": "user", "content": content}], True)


def write_jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def invalid_of(tmp_path: Path, *records: object) -> list[tuple[str, str]]:
    return prepare_dataset(write_jsonl(tmp_path / "d.jsonl", *records), GEMMA).invalid


# File formats


def test_jsonl_records_are_identified_by_id_or_physical_line():
    records = load_records(DATA / "mixed_invalid.jsonl")
    assert [r.id for r in records[:5]] == ["alpaca-ok", "line 2", "line 4", "completion-ok", "line 6"]  # 3 is blank
    assert records[1].fields == {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert records[1].problem is None
    assert len(records) == 18
    broken, array = records[6:8]
    assert (broken.id, broken.problem) == ("line 8", MIXED_INVALID["line 8"])
    assert (array.id, array.problem) == ("line 9", MIXED_INVALID["line 9"])


def test_json_file_with_data_key_identifies_items_by_index():
    report = prepare_dataset(DATA / "small.json", GEMMA)
    assert [e.id for e in report.examples] == ["json-alpaca", "item 1", "item 2"]
    assert report.invalid == [("item 3", "the item is a string, not an object"), ("item 4", "'output' is empty")]
    assert report.kinds == Counter(alpaca=2, prompt_response=1, chat=1, unrecognised=1)


def test_json_file_may_be_a_top_level_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"prompt": "Hi", "response": "Hello"}, {"id": 7, "prompt": "Yo", "response": "Hey"}]))
    assert [e.id for e in prepare_dataset(path, GEMMA).examples] == ["item 0", "7"]


@pytest.mark.parametrize("content, problem", [
    ('{"records": []}', 'expected a list of records or {"data": [...]} at the top level, found an object'),
    ("[{]", "not valid JSON"),
])
def test_json_file_of_the_wrong_shape_is_a_dataset_error(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=f"{path}: " + problem.replace("[", r"\[").replace("{", r"\{")):
        load_records(path)


def test_csv_rows_are_identified_by_id_or_line_after_the_header():
    report = prepare_dataset(DATA / "small.csv", GEMMA)
    assert [e.id for e in report.examples] == ["line 2", "csv-with-input"]
    assert report.examples[1].prompt == user_prompt("Answer in one word.\n\nWhat animal says moo?")
    assert report.invalid == [("line 4", "'output' is empty"), ("csv-extra", "has 5 cells, but the header names 4")]


def test_unsupported_or_unreadable_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"unsupported file type '\.txt'; use \.jsonl"):
        load_records(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="cannot read the file"):
        load_records(tmp_path / "missing.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "response": "ok"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="as UTF-8 text"):
        load_records(latin1)


# Record kinds and rendering


def test_alpaca_renders_the_instruction_as_the_gemma_user_turn():
    report = prepare_dataset(DATA / "train_small.jsonl", GEMMA, strict=True)
    assert len(report.examples) == 40 and report.kinds == Counter(alpaca=40) and not report.invalid
    first = report.examples[0]
    assert first == Example("fact-01", user_prompt("What colour is the sky on a clear day?"), "Blue.<end_of_turn>")
    assert all(e.response.endswith("<end_of_turn>") for e in report.examples)


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl",
                       {"instruction": "Translate.", "input": "cat", "output": "chat"},
                       {"instruction": "Greet.", "input": "  ", "output": "Hi"},
                       {"instruction": "Greet.", "input": None, "output": "Hi"})
    prompts = [e.prompt for e in prepare_dataset(path, GEMMA, strict=True).examples]
    assert prompts == [user_prompt("Translate.\n\ncat"), user_prompt("Greet."), user_prompt("Greet.")]


@pytest.mark.parametrize("record", [
    {"prompt": "What do bees make?", "response": "Honey."},
    {"instruction": "What do bees make?", "response": "Honey."},
    {"prompt": "What do bees make?", "completion": "Honey."},
])
def test_prompt_response_variants(tmp_path, record):
    report = prepare_dataset(write_jsonl(tmp_path / "p.jsonl", record), GEMMA, strict=True)
    assert report.kinds == Counter(prompt_response=1)
    assert report.examples == [Example("line 1", user_prompt("What do bees make?"), "Honey.<end_of_turn>")]


def test_chat_trains_the_last_assistant_turn_with_the_earlier_ones_in_the_prompt():
    example = {e.id: e for e in prepare_dataset(DATA / "mixed_invalid.jsonl", GEMMA).examples}["chat-ok"]
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What do bees make?"}]
    assert example.prompt == GEMMA(history, True)
    assert example.response == "Honey.<end_of_turn>"
    assert example.prompt + example.response + "\n" == GEMMA([*history, {"role": "assistant", "content": "Honey."}],
                                                             False)


@pytest.mark.parametrize("chat_format, response", [  # llama3 and gemma trim the content, as their templates do
    (CHATML, " Honey. <|im_end|>"), (LLAMA3, "Honey.<|eot_id|>"), (MISTRAL, " Honey. </s>"),
    (GEMMA, "Honey.<end_of_turn>"),
])
def test_each_family_ends_the_response_with_its_end_of_turn_marker(tmp_path, chat_format, response):
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "What do bees make?", "response": " Honey. "})
    [example] = prepare_dataset(path, chat_format, strict=True).examples
    assert example.prompt == user_prompt("What do bees make?", chat_format)
    assert example.response == response


# Invalid records


def test_every_invalid_record_is_reported_with_its_identifier_and_problem():
    report = prepare_dataset(DATA / "mixed_invalid.jsonl", GEMMA)
    assert dict(report.invalid) == MIXED_INVALID
    assert [example_id for example_id, _ in report.invalid] == list(MIXED_INVALID)  # file order
    assert [e.id for e in report.examples] == ["alpaca-ok", "line 2", "line 4", "completion-ok", "line 6", "chat-ok"]
    assert report.kinds == Counter(chat=7, alpaca=4, prompt_response=4, unrecognised=3)


@pytest.mark.parametrize("record, problem", [
    ({"output": "Paris"}, "missing field 'instruction'"),
    ({"prompt": "Hi"}, "missing field 'response'"),
    ({"completion": "Hi"}, "missing field 'prompt'"),
    ({"instruction": ["a"], "output": "b"}, "'instruction' is an array (expected a string)"),
    ({"instruction": "a", "input": 3, "output": "b"}, "'input' is a number (expected a string)"),
    ({"prompt": "a", "response": None}, "'response' is null (expected a string)"),
    ({"prompt": "\n", "response": True}, "'prompt' is empty; 'response' is a boolean (expected a string)"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": ["hi", {"role": "assistant", "content": "yo"}]},
     "'messages[0]' is a string (expected an object with role and content); 'messages' has no user turn"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "missing field 'messages[0].role'; 'messages' has no user turn"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]},
     "'messages[0].content' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": {"text": "yo"}}]},
     "'messages[1].content' is an object (expected a string)"),
    ({"text": "hi"}, "no recognised fields (expected 'messages', 'instruction' and 'output', "
                     "or 'prompt' and 'response'); found 'text'"),
])
def test_invalid_record_problems_name_the_field(tmp_path, record, problem):
    assert invalid_of(tmp_path, {"id": "r", **record}) == [("r", problem)]


def test_an_empty_id_falls_back_to_the_line(tmp_path):
    assert invalid_of(tmp_path, {"id": " ", "output": "x"}) == [("line 1", "missing field 'instruction'")]


def test_strict_mode_raises_listing_every_invalid_example():
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DATA / "mixed_invalid.jsonl", GEMMA, strict=True)
    assert caught.value.problems == list(MIXED_INVALID.items())
    message = str(caught.value)
    assert "12 invalid example(s)" in message
    for example_id, problem in MIXED_INVALID.items():
        assert f"\n  {example_id}: {problem}" in message
    assert isinstance(caught.value, ValueError)


# Tokenizing


@pytest.fixture(scope="module")
def gemma_tokenize(hf_folder):
    """The embedded model's own tokenizer (from its conversion under JARVIS_DATA_DIR, made if missing)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    return lambda text, add_special: tokenizer(text, add_special_tokens=add_special)["input_ids"]


@pytest.mark.slow
def test_only_response_tokens_carry_loss(gemma_tokenize):
    example = prepare_dataset(DATA / "train_small.jsonl", GEMMA).examples[0]
    input_ids, labels = tokenize_example(example, gemma_tokenize)
    prompt_ids, response_ids = gemma_tokenize(example.prompt, True), gemma_tokenize(example.response, False)
    assert input_ids == prompt_ids + response_ids and len(labels) == len(input_ids)
    assert labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == input_ids[len(prompt_ids):] == response_ids
    assert input_ids[0] == 2  # <bos>, once, from the prompt
    assert 2 not in input_ids[1:]
    assert response_ids[-1:] == gemma_tokenize("<end_of_turn>", False) == [106] and len(response_ids) > 1


@pytest.mark.slow
def test_truncation_keeps_the_left_part_and_drops_examples_without_a_response_token(gemma_tokenize):
    example = prepare_dataset(DATA / "train_small.jsonl", GEMMA).examples[0]
    full_ids, full_labels = tokenize_example(example, gemma_tokenize)
    prompt_length = len(gemma_tokenize(example.prompt, True))
    assert tokenize_example(example, gemma_tokenize, max_length=len(full_ids)) == (full_ids, full_labels)
    input_ids, labels = tokenize_example(example, gemma_tokenize, max_length=prompt_length + 1)
    assert input_ids == full_ids[:prompt_length + 1] and labels == full_labels[:prompt_length + 1]
    assert labels[-1] != IGNORE_INDEX
    assert tokenize_example(example, gemma_tokenize, max_length=prompt_length) is None
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(example, gemma_tokenize, max_length=0)


def test_masking_with_a_stand_in_tokenizer():
    def characters(text: str, add_special: bool) -> list[int]:
        return ([0] if add_special else []) + [ord(c) for c in text]

    input_ids, labels = tokenize_example(Example("x", "ab", "cd"), characters)
    assert input_ids == [0, 97, 98, 99, 100] and labels == [IGNORE_INDEX] * 3 + [99, 100]


# Splitting


def test_split_is_deterministic_disjoint_and_complete():
    examples = prepare_dataset(DATA / "train_small.jsonl", GEMMA).examples
    train, held_out = split_eval(examples, 0.2, seed=3)
    assert (train, held_out) == split_eval(examples, 0.2, seed=3)
    assert len(held_out) == 8 and len(train) == 32
    assert sorted(e.id for e in train + held_out) == sorted(e.id for e in examples)
    assert train == [e for e in examples if e in train]  # file order kept
    assert [e.id for e in split_eval(examples, 0.2, seed=4)[1]] != [e.id for e in held_out]


def test_split_keeps_one_example_on_each_side():
    examples = [Example(str(i), "p", "r") for i in range(3)]
    assert [len(part) for part in split_eval(examples, 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in split_eval(examples, 0.99, seed=0)] == [1, 2]
    assert split_eval(examples, 0, seed=0) == (examples, [])
    assert split_eval(examples[:1], 0.5, seed=0) == (examples[:1], [])
    with pytest.raises(ValueError, match="eval fraction"):
        split_eval(examples, 1.0, seed=0)


# `jarvis data check`


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("jarvis")
    register(group)
    return group


def test_data_check_reports_kinds_invalid_ids_and_a_summary(cli):
    result = CliRunner().invoke(cli, ["data", "check", str(DATA / "mixed_invalid.jsonl")])
    assert result.exit_code == 0, result.output
    for example_id, problem in MIXED_INVALID.items():
        assert f"✗ {example_id}: {problem}" in result.output
    for kind, count in {"alpaca": 4, "chat": 7, "prompt_response": 4, "unrecognised": 3}.items():
        assert any(kind in line and line.rstrip(" │|").endswith(str(count)) for line in result.output.splitlines())
    assert "6 valid, 12 invalid" in result.output


def test_data_check_strict_exits_1_on_invalid_examples_only(cli):
    failing = CliRunner().invoke(cli, ["data", "check", "--strict", str(DATA / "mixed_invalid.jsonl")])
    assert failing.exit_code == 1 and "6 valid, 12 invalid" in failing.output
    passing = CliRunner().invoke(cli, ["data", "check", "--strict", "--chat-format", "chatml",
                                       str(DATA / "train_small.jsonl")])
    assert passing.exit_code == 0 and "40 valid, 0 invalid" in passing.output


def test_data_check_renders_with_the_chosen_format(cli):
    # gemma rejects the non-alternating chat; chatml renders it.
    result = CliRunner().invoke(cli, ["data", "check", "--chat-format", "chatml", str(DATA / "mixed_invalid.jsonl")])
    assert "not-alternating" not in result.output and "7 valid, 11 invalid" in result.output


def test_data_check_rejects_an_unsupported_file(cli, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    result = CliRunner().invoke(cli, ["data", "check", str(notes)])
    assert result.exit_code == 1 and "unsupported file type '.txt'" in result.output
