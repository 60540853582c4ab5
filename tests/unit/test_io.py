"""Atomic writes: all or nothing, with ordinary file permissions."""

import os

import pytest

from ovseg.utils.io import atomic_write_text


def test_atomic_file_gets_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    from ovseg.utils.io import atomic_open

    atomic_write_text(tmp_path / "r.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "r.json") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "r.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
