import os
import stat

import pytest

from llm.files import replacing, write_atomically


def test_write_atomically_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    write_atomically(path, "new\n")
    write_atomically(tmp_path / "weights.bin", b"\x00\x01", durable=True)
    assert path.read_text() == "new\n" and (tmp_path / "weights.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "weights.bin"]


def test_a_write_that_fails_halfway_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("kept\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(path) as tmp:
            tmp.write_text("half of a new")
            raise RuntimeError("disk full")
    assert path.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_temporary_file_left_by_a_killed_write_is_replaced_not_reused(tmp_path):
    leftover = tmp_path / ".model.safetensors.tmp"
    leftover.write_bytes(b"half")
    leftover.chmod(0o600)
    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "model.safetensors", b"whole")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
