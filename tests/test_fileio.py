"""Atomic writes: complete file or none, usual permissions, no temporary files left."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from filo.fileio import atomic_save_npy, atomic_torch_save, atomic_write, atomic_write_text


def test_writes_land_whole_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a" / "b.txt", "hello")
        assert p.read_text() == "hello"
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pth")
        assert torch.equal(torch.load(tmp_path / "m.pth", map_location="cpu")["w"], torch.ones(2))
        atomic_save_npy(tmp_path / "x.npy", np.arange(3))
        assert np.array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.txt", "m.pth", "x.npy"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "t.txt", "old")

    def explode(fh):
        fh.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
