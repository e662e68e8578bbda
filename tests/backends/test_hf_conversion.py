"""The GGUF → transformers conversion: its tokenizer tokenizes exactly as llama.cpp does on the same GGUF,
a stale conversion is redone, and a tokenizer that disagrees is never published."""

from __future__ import annotations

import json
import shutil

import pytest

from jarvis.backends.model_tools.convert import (
    CONVERTER_VERSION,
    MARKER,
    gguf_tokenizer_flags,
    is_converted,
    llama_cpp_token_ids,
    tokenizer_mismatches,
)
from jarvis.plugins.chat_formats.families import GEMMA

pytestmark = pytest.mark.slow

TEXTS = (
    "The capital of France is",
    "",
    " ",
    "Hello, world!",
    "  two leading spaces and a trailing one ",
    GEMMA([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}], True),
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "naïve café, Ærøskøbing, Straße, 東京タワー, 서울, Москва, مرحبا, 🚀🎉👩‍💻",
    "tabs\tand\nnewlines\r\n\n\nand   runs   of   spaces",
    "numbers 1234567890 3.14159 -42 1e-9",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "<bos>a text that begins with the bos token's text",
    "<unused0> <mask> <eos>",
)


@pytest.fixture(scope="module")
def converted(hf_folder, embedded_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_folder)


def test_the_gguf_asks_for_bos_and_not_eos(embedded_gguf):
    assert gguf_tokenizer_flags(embedded_gguf) == {"add_bos_token": True, "add_eos_token": False}


def test_converted_tokenizer_gives_llama_cpp_ids(converted, embedded_gguf):
    expected = llama_cpp_token_ids(embedded_gguf, TEXTS)
    for text, want in zip(TEXTS, expected):
        assert converted(text, add_special_tokens=True)["input_ids"] == want, text
    assert expected[0][0] == converted.bos_token_id == 2  # one <bos>, first


def test_without_special_tokens_no_bos_is_added(converted, embedded_gguf):
    from llama_cpp import Llama

    vocab = Llama(str(embedded_gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert converted(text, add_special_tokens=False)["input_ids"] == vocab.tokenize(
            text.encode(), add_bos=False, special=True), text


def test_a_tokenizer_without_bos_is_caught(converted, embedded_gguf, hf_folder, tmp_path):
    from tokenizers import processors

    converted.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    broken = tmp_path / "no-bos"
    converted.save_pretrained(broken)
    mismatches = tokenizer_mismatches(broken, embedded_gguf)
    assert mismatches and "The capital of France is" in mismatches[0] and "[2, 818" in mismatches[0]


@pytest.fixture(scope="module")
def reconverted(hf_folder, embedded_gguf, tmp_path_factory):
    """The module's one real conversion, done the way both properties need: a copy of the session's folder made
    stale (its marker names an older converter) is converted again by `jarvis models convert`, with the
    session's tokenizer folder in place of the GGUF's tokenizer. The command runs in this process (click's
    runner), which has torch and transformers imported already: a subprocess spent 9 s importing them."""
    from click.testing import CliRunner

    from jarvis.bootstrap import bootstrap
    from jarvis.cli import build_cli

    out = tmp_path_factory.mktemp("reconvert") / "stale"
    shutil.copytree(hf_folder, out)
    stamp = json.loads((out / MARKER).read_text())
    was_current = stamp["converter_version"] == CONVERTER_VERSION and is_converted(out, stamp["source_sha256"])
    (out / MARKER).write_text(json.dumps({**stamp, "converter_version": CONVERTER_VERSION - 1}))
    was_stale = not is_converted(out, stamp["source_sha256"])
    boot = bootstrap()
    done = CliRunner().invoke(build_cli(boot), ["models", "convert", "--gguf", str(embedded_gguf), "--out", str(out),
                                                "--tokenizer", str(hf_folder)], obj=boot)
    return {"out": out, "stamp": stamp, "was_current": was_current, "was_stale": was_stale, "done": done,
            "mismatches": tokenizer_mismatches(out, embedded_gguf, TEXTS) if done.exit_code == 0 else None}


def test_a_stale_conversion_is_redone(reconverted):
    assert reconverted["was_current"] and reconverted["was_stale"]
    assert reconverted["done"].exit_code == 0, reconverted["done"].output
    redone = json.loads((reconverted["out"] / MARKER).read_text())
    assert redone["converter_version"] == CONVERTER_VERSION and redone["tokenizer_probes"] > 0
    assert redone["source_sha256"] == reconverted["stamp"]["source_sha256"]
    assert is_converted(reconverted["out"], redone["source_sha256"])
    assert reconverted["mismatches"] == []


def test_recorded_probe_ids_are_llama_cpps(embedded_gguf, hf_folder):
    """The ids a host without llama_cpp checks against are llama.cpp's own, and the published tokenizer
    gives them; a tokenizer that splits words differently (transformers 5.17's GGUF tokenizer for Gemma 3
    does) fails them."""

    from jarvis.backends.model_tools.convert import PROBE_TEXTS, RECORDED_PROBE_IDS

    stamp = json.loads((hf_folder / MARKER).read_text())
    recorded = [list(ids) for ids in RECORDED_PROBE_IDS[stamp["source_sha256"]]]
    assert recorded == llama_cpp_token_ids(embedded_gguf, PROBE_TEXTS)
    assert tokenizer_mismatches(hf_folder, embedded_gguf, expected=recorded) == []
    split = [[2, 818, 505, 670, 509, 514, 529, 2102, 508, 588, 563]] + recorded[1:]  # 5.17's "The capital of ..."
    mismatches = tokenizer_mismatches(hf_folder, embedded_gguf, expected=split)
    assert len(mismatches) == 1 and "The capital of France is" in mismatches[0]


def test_a_tokenizer_folder_replaces_the_ggufs(reconverted):
    done, out = reconverted["done"], reconverted["out"]
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert reconverted["mismatches"] == []
