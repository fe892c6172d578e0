"""A checkpoint folder reaches the checkpoints folder whole, on the same file system or not."""

import errno
import os

import pytest

from training_image import checkpoint


def _folder(path):
    path.mkdir(parents=True)
    (path / "a").write_text("shard")
    (path / ".metadata").write_text("last")
    return path


def test_a_move_across_file_systems_copies_then_renames(tmp_path, monkeypatch):
    source = _folder(tmp_path / "staging" / "step-3")
    target = tmp_path / "checkpoints" / "step-3"
    target.parent.mkdir()
    rename = os.rename
    calls = []

    def cross_device(src, dst):
        calls.append((str(src), str(dst)))
        if str(src) == str(source):  # the mount boundary: only the staging folder is elsewhere
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", cross_device)
    checkpoint.move_whole(source, target)
    assert (target / ".metadata").read_text() == "last" and (target / "a").read_text() == "shard"
    assert not source.exists() and sorted(p.name for p in target.parent.iterdir()) == ["step-3"]
    # The copy lands under a hidden name that latest() does not read, and is renamed in whole.
    assert calls[-1] == (str(target.parent / ".step-3.copying"), str(target))


def test_other_rename_errors_are_not_hidden(tmp_path, monkeypatch):
    source = _folder(tmp_path / "staging" / "step-1")

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "denied")

    monkeypatch.setattr(checkpoint.os, "rename", denied)
    with pytest.raises(PermissionError):
        checkpoint.move_whole(source, tmp_path / "step-1")
    assert (source / ".metadata").exists()
