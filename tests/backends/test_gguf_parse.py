"""The converter parses a GGUF's header once: transformers asks for a new `gguf.GGUFReader` for the config, the
tokenizer and the weights, and each parse of the embedded model's 262,144-entry vocabulary costs seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from jarvis.backends.model_tools.convert import one_gguf_parse


def write_gguf(path: Path, value: int) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("probe.value", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_reader_per_file_while_the_block_runs(tmp_path):
    import gguf

    a, b = write_gguf(tmp_path / "a.gguf", 1), write_gguf(tmp_path / "b.gguf", 2)
    with one_gguf_parse():
        from gguf import GGUFReader  # as transformers' loader imports it, at call time

        first, again, by_name = gguf.GGUFReader(a), gguf.GGUFReader(str(a)), GGUFReader(tmp_path / "." / "a.gguf")
        other = gguf.GGUFReader(b)
    assert first is again is by_name and other is not first
    assert first.fields["probe.value"].contents() == 1 and other.fields["probe.value"].contents() == 2
    assert gguf.GGUFReader(a) is not first  # afterwards every call parses again
    assert isinstance(gguf.GGUFReader, type)  # the class itself again
