"""The converter parses a GGUF's header once: transformers asks for a new `gguf.GGUFReader` for the config, the
tokenizer and the weights, and each parse of the embedded model's 262,144-entry vocabulary costs seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from jarvis.backends.model_tools.convert import one_gguf_parse


def write_gguf(path: Path, value: int, key: str = "probe.value") -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32(key, value)
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


def test_transformers_loader_parses_once_inside_the_block(tmp_path, monkeypatch):
    """The swap reaches transformers' own GGUF loader: two loads inside the block parse the file once. Fails if
    transformers stops looking `GGUFReader` up on the `gguf` module when it loads (the speed-up would be gone)."""
    import gguf

    loader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    path = write_gguf(tmp_path / "tiny.gguf", 16, key="llama.context_length")
    parses = []

    class Counting(gguf.GGUFReader):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with one_gguf_parse():
        for _ in range(2):
            assert "config" in loader.load_gguf_checkpoint(str(path), return_tensors=False)
    assert len(parses) == 1
