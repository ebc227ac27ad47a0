"""atomic_file: the name holds the old file or the complete new one, and no temporary is left."""

from __future__ import annotations

import pytest

from ldm_cli.atomic import atomic_file


@pytest.mark.parametrize("fsync", [False, True])
def test_a_completed_block_replaces_the_file(tmp_path, fsync):
    path = tmp_path / "index.json"
    path.write_text("old")
    with atomic_file(path, "w", fsync=fsync) as handle:
        handle.write("new\n")
        assert path.read_text() == "old"  # nothing shows under the name until the block ends
    assert path.read_text() == "new\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["index.json"]


def test_an_error_in_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["image.png"]


def test_a_named_temporary_is_used_and_renamed(tmp_path):
    path, temporary = tmp_path / "metrics.csv", tmp_path / "metrics.csv.tmp"
    with atomic_file(path, "w", temporary=temporary) as handle:
        handle.write("a,b\r\n")
        assert temporary.exists()
    assert path.read_bytes() == b"a,b\r\n"  # text is written as given, line ends included
    assert not temporary.exists()
