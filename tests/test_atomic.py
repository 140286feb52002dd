"""Atomic writes: readable permissions (not mkstemp's 0600), no temp file left behind, old file kept on failure."""

import os
import stat

import pytest

from explainer.atomic import write_atomic, write_json_atomic, write_text_atomic


def test_permissions_follow_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask != 0o600
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"v": 1})

    def boom(handle):
        handle.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(path, boom)
    assert path.read_text() == '{\n  "v": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
