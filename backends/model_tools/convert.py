"""GGUF → transformers folder, once: how the HF (and vLLM) engines serve the embedded model.

transformers reads GGUF (`gguf_file=`), de-quantizing the weights; the result
is saved as a safetensors folder in float32 (the de-quantized values exactly,
so the HF engine computes with the same weights llama.cpp does).

The tokenizer is not taken on trust: the GGUF's own metadata says whether a
text gets `<bos>`/`<eos>` (`tokenizer.ggml.add_bos_token`, `add_eos_token`),
the converted tokenizer is made to do the same, and before the folder is
published a set of probe strings (plain, chat-formatted, unicode, empty) must
tokenize to the very ids llama.cpp gives on the same GGUF. A marker file
records the source's sha256 and `CONVERTER_VERSION`: a folder made by another
converter version is stale and converted again. An unfinished conversion never
looks done because the folder is renamed into place only at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jarvis.embedded_model import MODEL_ID, embedded_model_path, sha256_of

log = logging.getLogger("jarvis.backends.model_tools.convert")

MARKER = "jarvis-conversion.json"
#: Bumped whenever the conversion's output changes; a folder stamped with another version is redone.
#: 2: the tokenizer follows the GGUF's add_bos/add_eos and is checked against llama.cpp.
CONVERTER_VERSION = 2
#: Strings both tokenizers must turn into identical ids before a conversion is published.
PROBE_TEXTS = (
    "The capital of France is",
    "",
    " leading space, trailing space ",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "naïve café — 東京 🚀 ünïcödé",
    "line one\n\n\tline two\r\n",
    "def f(x):\n    return x ** 2  # 12345",
)
#: llama.cpp's ids for PROBE_TEXTS on the embedded GGUF (by sha256), so a host without llama_cpp (a GPU host
#: carrying only transformers and vLLM) still checks the converted tokenizer: transformers 5.17's GGUF
#: tokenizer for Gemma 3, for one, splits words into pieces llama.cpp never makes. A test keeps them equal to
#: what llama.cpp gives.
RECORDED_PROBE_IDS = {"a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": (
    [2, 818, 5279, 529, 7001, 563], [2], [2, 5830, 2557, 236764, 45330, 2557, 236743],
    [2, 105, 2364, 107, 10979, 993, 106, 107, 105, 4368, 107],
    [2, 1789, 238527, 560, 33443, 2192, 86459, 236743, 242015, 174898, 238527, 236755, 55515, 236859],
    [2, 1257, 886, 108, 255968, 1257, 1156, 251, 107],
    [2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 5213, 236743, 236778, 138, 236865, 236743, 236770,
     236778, 236800, 236812, 236810])}


class ConversionError(RuntimeError):
    """The converted folder would not behave as the GGUF does; nothing was published."""


def converted_dir(data_dir: Path) -> Path:
    return data_dir / "models" / f"{MODEL_ID}-hf"


def is_converted(folder: Path, source_sha256: str | None = None) -> bool:
    """A finished conversion by this converter version (of `source_sha256`, when given)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        stamp = json.loads(marker.read_text())
    except ValueError:
        return False
    if stamp.get("converter_version") != CONVERTER_VERSION:
        return False
    return source_sha256 is None or stamp.get("source_sha256") == source_sha256


def gguf_tokenizer_flags(gguf: Path) -> dict[str, bool]:
    """`add_bos_token` / `add_eos_token` as the GGUF's tokenizer metadata states them (llama.cpp's defaults
    for a SentencePiece vocabulary when absent: bos yes, eos no). Read by llama.cpp where it is installed:
    gguf-py parses every field, the vocabulary's hundreds of thousands of strings included (seconds)."""
    flags = {"add_bos_token": True, "add_eos_token": False}
    if importlib.util.find_spec("llama_cpp") is not None:
        with llama_vocab(gguf) as vocab:
            metadata = dict(vocab.metadata)
        for key in flags:
            if (value := metadata.get(f"tokenizer.ggml.{key}")) is not None:
                flags[key] = value.strip().lower() in ("true", "1")
        return flags
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    for key in flags:
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            flags[key] = bool(field.parts[field.data[0]][0])
    return flags


_ONE_PARSE = threading.Lock()


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """While the block runs, every `gguf.GGUFReader` of one file is the same reader. transformers parses the
    GGUF anew for the config, the tokenizer and the weights, and gguf-py reads the header field by field:
    Gemma 3's 262,144-entry vocabulary costs about 15 s a parse on two cores, three times a conversion. One block
    runs at a time in a process, so the swap is never nested."""
    import gguf

    with _ONE_PARSE:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], Any] = {}

        def shared(path: Any, mode: str = "r") -> Any:
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        gguf.GGUFReader = shared
        try:
            yield
        finally:
            gguf.GGUFReader = original


@contextlib.contextmanager
def llama_vocab(gguf: Path) -> Iterator[Any]:
    """The GGUF's vocabulary and metadata as llama.cpp reads them (no weights loaded), closed afterwards."""
    from llama_cpp import Llama

    vocab = Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        yield vocab
    finally:
        vocab.close()


def llama_cpp_token_ids(gguf: Path, texts: tuple[str, ...]) -> list[list[int]]:
    """How llama.cpp tokenizes `texts` as the engines do (bos per the GGUF, special tokens parsed)."""
    with llama_vocab(gguf) as vocab:
        return [vocab.tokenize(text.encode(), add_bos=True, special=True) for text in texts]


def tokenizer_mismatches(folder: Path, gguf: Path, texts: tuple[str, ...] = PROBE_TEXTS,
                         expected: list[list[int]] | None = None) -> list[str]:
    """Each probe text the converted tokenizer (loaded back from `folder`) tokenizes unlike llama.cpp (or
    unlike `expected`, llama.cpp's ids recorded earlier)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = expected if expected is not None else llama_cpp_token_ids(gguf, texts)
    return [f"{text!r}: transformers {got} vs llama.cpp {want}"
            for text, want in zip(texts, expected)
            if (got := tokenizer(text, add_special_tokens=True)["input_ids"]) != want]


def apply_gguf_special_tokens(tokenizer: object, flags: dict[str, bool]) -> None:
    """Make `tokenizer` add `<bos>`/`<eos>` exactly when the GGUF says to, and keep that when saved."""
    from tokenizers import processors

    bos, eos = tokenizer.bos_token, tokenizer.eos_token  # type: ignore[attr-defined]
    single = " ".join([*([f"{bos}:0"] if flags["add_bos_token"] else []), "$A:0",
                       *([f"{eos}:0"] if flags["add_eos_token"] else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if flags["add_bos_token"] else []), "$B:1",
                                    *([f"{eos}:1"] if flags["add_eos_token"] else [])])
    special = [(t, tokenizer.convert_tokens_to_ids(t)) for t in {bos, eos} if t]  # type: ignore[attr-defined]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(  # type: ignore[attr-defined]
        single=single, pair=pair, special_tokens=special)
    for key, value in flags.items():  # written to tokenizer_config.json, read back on load
        try:
            setattr(tokenizer, key, value)
        except (AttributeError, ValueError):
            pass
        tokenizer.init_kwargs[key] = value  # type: ignore[attr-defined]


def convert_gguf(gguf: Path, out_dir: Path, *, source_sha256: str | None = None,
                 tokenizer_dir: Path | None = None) -> Path:
    """Write `out_dir` (config, tokenizer, float32 safetensors) from a GGUF file; the tokenizer from
    `tokenizer_dir` instead of the GGUF's when given (checked against llama.cpp's ids all the same)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = source_sha256 or sha256_of(gguf)
    if is_converted(out_dir, digest):
        return out_dir
    started = time.monotonic()
    with one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else \
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        flags = gguf_tokenizer_flags(gguf)
    # A model read from GGUF carries a GGUF "quantizer" that refuses save_pretrained; the weights
    # are already de-quantized, so the folder is an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    apply_gguf_special_tokens(tokenizer, flags)
    tokenizer.save_pretrained(staging)
    probes: int | str = len(PROBE_TEXTS)
    recorded = RECORDED_PROBE_IDS.get(digest)
    if importlib.util.find_spec("llama_cpp") is not None:
        mismatches = tokenizer_mismatches(staging, gguf)
    elif recorded is not None:  # e.g. a GPU host that carries only transformers + vLLM
        probes = f"{len(PROBE_TEXTS)}, against llama.cpp's recorded ids"
        mismatches = tokenizer_mismatches(staging, gguf, expected=[list(ids) for ids in recorded])
    else:
        probes = "skipped: llama_cpp is not installed"
        log.warning("tokenizer of %s not checked against llama.cpp (llama_cpp is not installed)", gguf.name)
        mismatches = []
    if mismatches:
        import transformers

        raise ConversionError(
            f"the tokenizer converted from {gguf.name} by transformers {transformers.__version__} does not "
            f"tokenize as llama.cpp does (left unpublished in {staging}):\n  " + "\n  ".join(mismatches)
            + "\nfix: install transformers>=5.19, or give a tokenizer folder that does "
              "(jarvis models convert --tokenizer DIR)")
    (staging / MARKER).write_text(json.dumps({
        "source": str(gguf), "source_sha256": digest, "dtype": "float32", "converter_version": CONVERTER_VERSION,
        "tokenizer_probes": probes, "seconds": round(time.monotonic() - started, 1)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def embedded_hf_model(data_dir: Path) -> Path:
    """The embedded model as a transformers folder, converting it on first use."""
    folder = converted_dir(data_dir)
    gguf = embedded_model_path(data_dir)
    stamp = json.loads(gguf.with_name(gguf.name + ".verified").read_text())
    return convert_gguf(gguf, folder, source_sha256=stamp["sha256"])
