"""Adapter paths are confined to the adapter root, and a path that cannot name a file is a 400, not a crash."""

from __future__ import annotations

import pytest

from jarvis.adapters import InvalidAdapter, confine


def test_paths_inside_the_root_resolve(tmp_path):
    (tmp_path / "a").mkdir()
    assert confine("a", tmp_path) == (tmp_path / "a").resolve()
    assert confine(tmp_path / "a", tmp_path) == (tmp_path / "a").resolve()


@pytest.mark.parametrize("path, code", [
    ("../outside", "path_outside_root"),
    ("/etc", "path_outside_root"),
    ("escape", "path_outside_root"),  # a symlink out of the root
    ("a\x00b", "invalid_path"),
    ("bad-\udc2d-surrogate", "invalid_path"),
])
def test_escapes_and_unusable_paths_are_400(tmp_path, path, code):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    (tmp_path / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidAdapter) as info:
        confine(path, tmp_path)
    assert info.value.status_code == 400 and info.value.code == code
