"""The one atomic writer (``llada_cpt.files.write_atomic``): all or nothing, no temporary left behind."""
from __future__ import annotations

import os

import pytest

from llada_cpt.files import write_atomic


def test_writes_replaces_and_leaves_only_the_target(tmp_path):
    target = tmp_path / "sub" / "latest"
    write_atomic(target, "iter_0000001\n", durable=True)
    write_atomic(target, "iter_0000002\n")
    assert target.read_text() == "iter_0000002\n"
    assert os.listdir(target.parent) == ["latest"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
