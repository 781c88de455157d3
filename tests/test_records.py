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
import records

pytestmark = pytest.mark.slow


def _no_training(*args, **kwargs):
    raise AssertionError("trained although the record was complete")


def test_record_lifecycle(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=3"])
    work, record = tmp_path / "work" / "run", tmp_path / "repo" / "run"

    # interrupted as round 3 starts: the next call resumes from the round-2 checkpoint
    original = Federation._train_round
    monkeypatch.setattr(
        Federation,
        "_train_round",
        lambda self, r: (_ for _ in ()).throw(KeyboardInterrupt) if r == 3 else original(self, r),
    )
    with pytest.raises(KeyboardInterrupt):
        records.ensure_record(cfg, work, record)
    monkeypatch.setattr(Federation, "_train_round", original)
    assert not record.exists()
    assert records.ensure_record(cfg, work, record) == "resumed"
    assert all((record / name).exists() for name in records.RECORD_FILES)
    assert not (record / "checkpoints").exists()  # weights stay in the work folder
    results = (record / "results.json").read_bytes()

    # record and weights present: nothing is trained
    monkeypatch.setattr(records, "in_process_run", _no_training)
    assert records.ensure_record(cfg, work, record, need_weights=True) == "recorded"

    # a fresh machine: the record alone serves the tables; weights are retrained only when needed
    shutil.rmtree(work)
    assert records.ensure_record(cfg, work, record) == "recorded"
    monkeypatch.undo()
    assert records.ensure_record(cfg, work, record, need_weights=True) == "trained"
    assert (record / "results.json").read_bytes() == results  # the committed record is kept as it was
    retrained = json.loads((work / "results.json").read_text())
    assert retrained["models"] == json.loads(results)["models"]  # and training is deterministic

    # a record of another config is refused with one message
    other = tiny_config(tmp_path / "cache", ["fl.rounds=2"])
    with pytest.raises(UserError, match="another config"):
        records.ensure_record(other, tmp_path / "work2", record)
    # the adapt section is not training: a record serves every adaptation setting
    assert (
        records.ensure_record(tiny_config(tmp_path / "cache", ["fl.rounds=3", "adapt.lr=0.5"]), work, record)
        == "recorded"
    )


def _fake_record(folder: Path, method: str, seed: int, dice: dict[str, dict[str, float]]) -> None:
    """A record with only what the tables read: results.json (two sites, Dice per model)."""
    folder.mkdir(parents=True)
    models = {
        m: {
            "sites": {s: {"dice": d, "hd95": 1.0, "assd": 1.0} for s, d in by_site.items()},
            "mean": {"dice": sum(by_site.values()) / 2, "hd95": 1.0, "assd": 1.0},
        }
        for m, by_site in dice.items()
    }
    (folder / "results.json").write_text(
        json.dumps({"method": method, "dataset": "synthetic", "seed": seed, "models": models})
    )


def test_paired_differences_by_hand_and_tables_reproducible(tmp_path):
    import bench_quality

    out = tmp_path / "quality"
    for seed, (g, p, bn) in enumerate([(0.5, 0.6, 0.55), (0.4, 0.45, 0.35), (0.6, 0.7, 0.65)]):
        _fake_record(
            out / "inside" / f"iopfl-s{seed}",
            "iopfl",
            seed,
            {"global": {"A": g, "B": g}, "personalized": {"A": p, "B": g}},
        )
        _fake_record(out / "inside" / f"fedbn-s{seed}", "fedbn", seed, {"personalized": {"A": bn, "B": bn}})
    _fake_record(out / "inside" / "local-s0", "local", 0, {"personalized": {"A": 0.1, "B": 0.2}})
    # Ditto's global model is FedAvg's: identical scores
    _fake_record(
        out / "inside" / "ditto-s0",
        "ditto",
        0,
        {"global": {"A": 0.5, "B": 0.5}, "personalized": {"A": 0.7, "B": 0.5}},
    )

    records_ = bench_quality.write_inside_tables(out)
    paired = json.loads((out / "inside-paired.json").read_text())
    pairs = paired["iopfl/global"]
    # by hand: iopfl personalized − global = (p − g) on A, 0 on B; mean over the two sites = (p − g) / 2
    assert pairs["iopfl/personalized"]["mean"] == pytest.approx([5.0, 2.5, 5.0])
    assert pairs["iopfl/personalized"]["A"] == pytest.approx([10.0, 5.0, 10.0])
    assert pairs["fedbn/personalized"]["mean"] == pytest.approx([5.0, -5.0, 5.0])
    assert pairs["local/personalized"]["seeds"] == [0]
    assert pairs["local/personalized"]["mean"] == pytest.approx([100 * (0.15 - 0.5)])
    assert "iopfl/global" not in pairs  # the reference itself
    # against IOP-FL's personalized models (mean (p + g) / 2 per seed): personalized models only
    vs_iopfl = paired["iopfl/personalized"]
    assert set(vs_iopfl) == {"fedbn/personalized", "local/personalized", "ditto/personalized"}
    assert vs_iopfl["fedbn/personalized"]["mean"] == pytest.approx([0.0, -7.5, 0.0])
    assert vs_iopfl["ditto/personalized"]["mean"] == pytest.approx([100 * (0.6 - 0.55)])
    md = (out / "inside-paired.md").read_text()
    assert "better in every seed" in md and "tie (signs differ" in md and "1 seed: no claim" in md
    assert "| ditto/global | +0.00 | +0.00 | +0.00 | +0.00 | identical in every seed |" in md
    assert md.index("Minus `iopfl/global`") < md.index("Minus `iopfl/personalized`")

    # the tables are a function of the records alone: rewritten byte for byte
    names = ["inside.md", "inside.csv", "inside-paired.md", "inside-paired.json"]
    before = {n: (out / n).read_bytes() for n in names}
    assert bench_quality.write_inside_tables(out) == records_
    assert {n: (out / n).read_bytes() for n in names} == before


def test_inside_design_seed_major():
    import bench_quality

    design = bench_quality.inside_design(["iopfl", "fedbn"], 2, ["local"], 1)
    assert design == [("iopfl", 0), ("fedbn", 0), ("iopfl", 1), ("fedbn", 1), ("local", 0)]


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    import bench_quality

    ran = []

    def job(suite, method, seed):
        ran.append(method)
        if method == "ditto":
            raise ImportError("cannot import name 'x'")
        return tmp_path / f"{method}-s{seed}"

    args = [("polyp", m, 0) for m in ("iopfl", "ditto", "fedbn")]
    with pytest.raises(SystemExit, match=r"1 of 3 runs failed: \('polyp', 'ditto', 0\)"):
        bench_quality.run_all(job, args, 1)
    assert ran == ["iopfl", "ditto", "fedbn"]
    err = capsys.readouterr().err
    assert "FAILED ('polyp', 'ditto', 0)" in err and "ImportError: cannot import name 'x'" in err
    assert bench_quality.run_all(job, args[::2], 1) == [tmp_path / "iopfl-s0", tmp_path / "fedbn-s0"]
