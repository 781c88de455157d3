"""Parallel sites (runtime.workers): the same numbers as one process, a resumable checkpoint, and no
worker outliving its run — after an error in a site or a SIGKILL of the parent."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from _tiny import interrupt_then_resume, tiny_config, tiny_tree
from iopfl.engine.local import in_process_run
from iopfl.engine.workers import WorkerSites
from iopfl.errors import UserError

pytestmark = pytest.mark.slow
ONE_THREAD = ["runtime.threads=1"]  # float sums depend on the thread count: equal counts, equal bits


def _numbers(results: dict) -> dict:
    return {k: results[k] for k in ("models", "last_round", "selection", "published")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    cfg = tiny_config(root / "cache", ONE_THREAD)
    return root, in_process_run(cfg, root / "one").run()


def test_two_workers_give_bit_identical_results(one_process):
    root, expected = one_process
    cfg = tiny_config(root / "cache", [*ONE_THREAD, "runtime.workers=2"])
    run = in_process_run(cfg, root / "two")
    assert isinstance(run.sites, WorkerSites)
    results = run.run()
    assert _numbers(results) == _numbers(expected)
    one = (root / "one" / "results.json").read_text()
    assert json.loads((root / "two" / "results.json").read_text()) == json.loads(one)
    assert sorted(p.name for p in (root / "two" / "experts").iterdir()) == [
        "SiteA.safetensors",
        "SiteB.safetensors",
        "SiteC.safetensors",
    ]
    assert not run.sites.procs  # stopped at the end of the run


def test_a_worker_run_resumes_exactly(one_process, tmp_path, monkeypatch):
    """Interrupted in round 3 and resumed: the numbers of an uninterrupted one-process run."""
    root, expected = one_process
    two = tiny_config(root / "cache", [*ONE_THREAD, "runtime.workers=2"])
    resumed = interrupt_then_resume(two, tmp_path / "run", monkeypatch)
    # the sites' state was gathered from the workers into the checkpoint and is scattered back to them
    assert _numbers(resumed) == _numbers(expected)


def test_a_site_whose_loss_diverges_is_left_out_with_one_message(one_process, tmp_path):
    root, _ = one_process
    cfg = tiny_config(root / "cache", [*ONE_THREAD, "runtime.workers=2", "train.lr=1e30"])
    run = in_process_run(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="fewer than fl.min_clients"):
        run.run()
    assert "is left out of training: site SiteA: local loss is nan" in (tmp_path / "run" / "run.log").read_text()
    assert not run.sites.procs


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start_long_run(root, tmp_path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`iopfl train` with 2 workers, once its first checkpoint is written; (process, its workers)."""
    config = tmp_path / "tiny.yaml"
    tree = tiny_tree(root / "cache", rounds=50)
    tree["runtime"] = {"workers": 2, "threads": 1}
    config.write_text(yaml.safe_dump(tree))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "iopfl.cli", "train", str(config), "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.1)
    workers = [
        c
        for c in _children(proc.pid)
        if "multiprocessing" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())
    ]
    return proc, workers


def _stop(proc: subprocess.Popen, workers: list[psutil.Process]) -> None:
    proc.kill()
    proc.communicate()
    for w in workers:
        if w.is_running():
            w.kill()


def test_no_worker_outlives_a_sigkilled_parent(one_process, tmp_path):
    proc, workers = _start_long_run(one_process[0], tmp_path)
    try:
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        _stop(proc, workers)


def test_a_worker_that_dies_ends_the_run_with_one_message(one_process, tmp_path):
    proc, workers = _start_long_run(one_process[0], tmp_path)
    try:
        assert len(workers) == 2
        workers[0].kill()  # e.g. the kernel's out-of-memory killer
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "died" in err and "Traceback" not in err, err
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive
    finally:
        _stop(proc, workers)


def test_sites_are_spread_by_load():
    from iopfl.engine.workers import assign

    assert assign(["A", "B", "C"], {"A": 600, "B": 370, "C": 120}, 2) == {"A": 0, "B": 1, "C": 1}
    assert assign(["A", "B", "C", "D"], dict.fromkeys("ABCD", 10), 2) == {"A": 0, "B": 1, "C": 0, "D": 1}
