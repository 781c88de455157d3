"""Benchmark evidence records (benchmarks/records.py): skip what is recorded, resume what was
interrupted, retrain only what is missing, refuse a record of another config."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from _tiny import tiny_config
from iopfl.engine.federation import Federation
from iopfl.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import records  # noqa: E402

pytestmark = pytest.mark.slow


def _no_training(*args, **kwargs):
    raise AssertionError("trained although the record was complete")


def test_record_lifecycle(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=3"])
    work, record = tmp_path / "work" / "run", tmp_path / "repo" / "run"

    # interrupted as round 3 starts: the next call resumes from the round-2 checkpoint
    original = Federation._train_round
    monkeypatch.setattr(Federation, "_train_round",
                        lambda self, r: (_ for _ in ()).throw(KeyboardInterrupt) if r == 3 else original(self, r))
    with pytest.raises(KeyboardInterrupt):
        records.ensure_record(cfg, work, record)
    monkeypatch.setattr(Federation, "_train_round", original)
    assert not record.exists()
    assert records.ensure_record(cfg, work, record) == "resumed"
    assert all((record / name).exists() for name in records.RECORD_FILES)
    assert not (record / "checkpoints").exists()   # weights stay in the work folder
    results = (record / "results.json").read_bytes()

    # record and weights present: nothing is trained
    monkeypatch.setattr(records, "in_process_run", _no_training)
    assert records.ensure_record(cfg, work, record, need_weights=True) == "recorded"

    # a fresh machine: the record alone serves the tables; weights are retrained only when needed
    shutil.rmtree(work)
    assert records.ensure_record(cfg, work, record) == "recorded"
    monkeypatch.undo()
    assert records.ensure_record(cfg, work, record, need_weights=True) == "trained"
    assert (record / "results.json").read_bytes() == results   # the committed record is kept as it was
    retrained = json.loads((work / "results.json").read_text())
    assert retrained["models"] == json.loads(results)["models"]   # and training is deterministic

    # a record of another config is refused with one message
    other = tiny_config(tmp_path / "cache", ["fl.rounds=2"])
    with pytest.raises(UserError, match="another config"):
        records.ensure_record(other, tmp_path / "work2", record)
    # the adapt section is not training: a record serves every adaptation setting
    assert records.ensure_record(tiny_config(tmp_path / "cache", ["fl.rounds=3", "adapt.lr=0.5"]),
                                 work, record) == "recorded"
