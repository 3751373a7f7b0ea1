"""arcfab_gym.atomic: what every writer of snapshots, pages, configs and data relies on."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from arcfab_gym.atomic import atomic_path, write_atomic


def test_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "page.html"
    assert write_atomic(target, "first") == target  # parents made
    write_atomic(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["page.html"]


def test_a_failed_write_leaves_the_old_file_as_it_was(tmp_path):
    target = tmp_path / "data.npz"
    write_atomic(target, b"old bytes")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "snapshot.arcfab", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, as open() makes


def test_a_path_writer_that_adds_a_suffix_writes_the_target(tmp_path):
    """np.savez appends .npz to a path without it: the temporary path keeps the suffix."""
    out = tmp_path / "episodes.npz"
    with atomic_path(out) as tmp:
        np.savez(tmp, a=np.arange(3))
    with np.load(out) as f:
        assert f["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episodes.npz"]
