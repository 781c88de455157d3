"""End-to-end in-process runs: results layout, determinism, selection and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from _tiny import interrupt_then_resume, tiny_config, tiny_tree
from iopfl.engine.local import in_process_run
from iopfl.errors import UserError

pytestmark = pytest.mark.slow


def _numbers(results: dict) -> dict:
    return {"models": results["models"], "last_round": results["last_round"], "selection": results["selection"]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    cfg = tiny_config(root / "cache")
    results = in_process_run(cfg, root / "run").run()
    return cfg, root, results


def test_results_follow_the_design_layout(baseline):
    cfg, root, results = baseline
    assert results["method"] == "iopfl" and results["seed"] == 0
    assert set(results["models"]) == {"global", "personalized"}
    for entry in list(results["models"].values()) + list(results["last_round"]["models"].values()):
        assert len(entry["sites"]) == 3
        for site in entry["sites"].values():
            assert {"dice", "hd95", "assd", "n"} <= set(site)
            assert 0.0 <= site["dice"] <= 1.0 and site["n"] > 0
        assert {"dice", "hd95", "assd"} <= set(entry["mean"])
    run = root / "run"
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "results.json", "checkpoints/last.safetensors"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["config_hash"] == cfg.digest()


def test_selection_uses_validation_only(baseline):
    _, root, results = baseline
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["split"] == "val" and x["model"] == "personalized"]
    for site, chosen in results["selection"]["personalized"].items():
        by_round = {x["round"]: x["dice"] for x in val if x["site"] == site}
        assert chosen == max(by_round, key=lambda r: (by_round[r], -r))
        test_at = [
            x
            for x in lines
            if x["split"] == "test" and x["model"] == "personalized" and x["site"] == site and x["round"] == chosen
        ][0]
        assert results["models"]["personalized"]["sites"][site]["dice"] == pytest.approx(test_at["dice"])


def test_same_seed_same_numbers(baseline, tmp_path):
    cfg, root, results = baseline
    again = in_process_run(cfg, tmp_path / "run").run()
    assert _numbers(again) == _numbers(results)


def test_resume_after_a_crash_equals_uninterrupted(baseline, tmp_path, monkeypatch):
    cfg, root, results = baseline
    resumed = interrupt_then_resume(cfg, tmp_path / "run", monkeypatch)
    assert _numbers(resumed) == _numbers(results)
    rounds = [json.loads(x)["round"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == sorted(rounds) and rounds.count(3) == len(rounds) // 3


def test_existing_run_is_not_overwritten(baseline):
    cfg, root, _ = baseline
    with pytest.raises(UserError, match="--resume"):
        in_process_run(cfg, root / "run").run()


def test_resume_with_a_changed_config_is_refused(baseline, tmp_path):
    cfg, root, _ = baseline
    other = tiny_config(root / "cache", ["fl.alpha=0.5"])
    with pytest.raises(UserError, match="different config"):
        in_process_run(other, root / "run").run(resume=True)


def test_sigkill_then_resume_via_cli(baseline, tmp_path):
    cfg, root, results = baseline
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(root / "cache")))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "iopfl.cli", "train", str(config), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.safetensors").exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((run / "results.json").read_text())
    assert _numbers(resumed) == _numbers(results)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert os.path.exists(run / "report.md")


def test_the_tiny_run_learns_and_seeds_matter(baseline, tmp_path):
    """Guards the other tests: numbers that never changed would make resume/selection tests vacuous."""
    cfg, root, results = baseline
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {(x["round"], x["site"]): x["dice"] for x in lines if x["split"] == "val" and x["model"] == "personalized"}
    assert len(set(val.values())) > 3
    assert results["models"]["personalized"]["mean"]["dice"] > 0.3
    other = in_process_run(tiny_config(root / "cache", ["seed=1"]), tmp_path / "run").run()
    assert _numbers(other) != _numbers(results)
