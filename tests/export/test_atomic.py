"""Atomic writes: the target appears whole or not at all, and folders (.mlpackage) are replaced too."""
import os

import pytest

from idkm_plugin.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_file_is_replaced_and_no_temporary_is_left(tmp_path):
    atomic_write_text(tmp_path / "a.json", "old")
    atomic_write_bytes(tmp_path / "a.json", b"new")
    assert (tmp_path / "a.json").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.json"]


def test_temporary_name_keeps_the_extension(tmp_path):
    with atomic_path(tmp_path / "m.mlpackage") as tmp:
        assert tmp.endswith(".mlpackage") and os.path.dirname(tmp) == str(tmp_path)
        os.makedirs(os.path.join(tmp, "Data"))


def test_folder_is_replaced_whole(tmp_path):
    for content in ("first", "second"):
        with atomic_path(tmp_path / "m.mlpackage") as tmp:
            os.makedirs(tmp)
            (open(os.path.join(tmp, content), "w")).close()
    assert os.listdir(tmp_path / "m.mlpackage") == ["second"]
    assert os.listdir(tmp_path) == ["m.mlpackage"]


def test_failure_keeps_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "r.md", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "r.md") as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "r.md").read_text() == "old" and os.listdir(tmp_path) == ["r.md"]
