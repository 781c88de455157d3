"""Crash safety: SIGKILL `iopfl train` repeatedly at different points, resume each time, and end with
exactly the numbers of an uninterrupted run; no checkpoint is ever unreadable."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from _events import assert_events_match_metrics
from _tiny import tiny_config, tiny_tree
from iopfl.engine.checkpoint import load_checkpoint
from iopfl.engine.local import in_process_run

pytestmark = pytest.mark.slow
KILLS = 5


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_five_sigkills_then_resume_equals_uninterrupted(tmp_path):
    overrides = ["fl.rounds=4"]
    expected = in_process_run(tiny_config(tmp_path / "cache", overrides), tmp_path / "reference").run()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(tmp_path / "cache", rounds=4)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "iopfl.cli", "train", str(config), "--out", str(run)]
    rng = random.Random(7)
    kills = 0
    for attempt in range(KILLS):
        proc = subprocess.Popen(
            cmd + (["--resume"] if attempt else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            # wait for progress (new metrics lines: training or evaluation under way), then kill a random
            # moment later, so the kills land in different phases of different rounds
            start, deadline = _lines(run / "metrics.jsonl"), time.time() + 120
            while (
                _lines(run / "metrics.jsonl") < start + 1 + attempt and proc.poll() is None and time.time() < deadline
            ):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            proc.kill()
            proc.wait()
        checkpoint = run / "checkpoints" / "last.safetensors"
        if checkpoint.exists():
            load_checkpoint(checkpoint)  # never half-written: this raises on a damaged file
    assert kills >= 3  # the run is short; most kills must land before it finishes
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((run / "results.json").read_text())
    for key in ("models", "last_round", "selection"):
        assert resumed[key] == expected[key]
    assert not list(run.rglob(".*.tmp"))
    assert_events_match_metrics(run)  # TensorBoard shows every round once, whatever the kills interrupted
