"""Checkpoints: atomic, pickle-free, and damage is a clear error."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from iopfl.engine import checkpoint
from iopfl.engine.checkpoint import load_checkpoint, pack, save_checkpoint, unpack
from iopfl.errors import UserError
from iopfl.fileio import FILE_MODE, atomic_write_text


def test_roundtrip(tmp_path):
    path = tmp_path / "ck.safetensors"
    tensors = {**pack("global", {"a.w": torch.arange(4.0)}), **pack("personal/S1", {"a.w": torch.ones(4)})}
    save_checkpoint(path, tensors, {"round": 3, "nested": {"x": [1, 2]}})
    loaded, state = load_checkpoint(path)
    assert state == {"round": 3, "nested": {"x": [1, 2]}}
    assert torch.equal(unpack("global", loaded)["a.w"], torch.arange(4.0))
    assert set(unpack("personal/S1", loaded)) == {"a.w"}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~mask


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"w": torch.randn(100)}, {"round": 1})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(UserError, match="ck.safetensors"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_payload_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(UserError, match="evil.safetensors"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"round": 1})

    def torn_write(payload, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"round": 2})
    tensors, state = load_checkpoint(path)
    assert state["round"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    assert list(tmp_path.iterdir()) == [path]
