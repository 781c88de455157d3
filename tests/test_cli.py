"""The command line: help, one-line errors with exit code 2, synth, train and report."""

import json
import subprocess
import sys

import pytest
import yaml

from _tiny import tiny_tree


def iopfl(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "iopfl.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", ["", "demo", "synth", "train", "adapt", "predict", "export", "report"])
def test_help(command):
    done = iopfl(*([command] if command else []), "--help")
    assert done.returncode == 0 and "Usage" in done.stdout


def test_version():
    from iopfl import __version__

    done = iopfl("--version")
    assert done.returncode == 0 and done.stdout.startswith(f"iopfl {__version__} (Python 3.")


def test_help_describes_arguments():
    # click 8.5 drops typer 0.20's help for positional arguments (hence the click pin in pyproject.toml)
    done = iopfl("train", "--help")
    assert "YAML config (see configs/)" in done.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "missing.yaml"], "missing.yaml"),
        (["train", "{cfg}", "-o", "fl.rounds=0"], "fl.rounds"),
        (["train", "{cfg}", "-o", "fl.nonsense=1"], "fl.nonsense"),
        (["train", "{cfg}", "-o", "data.root={tmp}/nowhere", "-o", "data.source=folder"], "nowhere"),
        (["adapt", "{tmp}/norun", "--target", "X"], "norun"),
        (["report", "{tmp}"], "results.json"),
        (
            [
                "train",
                "{cfg}",
                "-o",
                "runtime.device=cuda:7" if __import__("torch").cuda.is_available() else "runtime.device=cuda",
            ],
            "runtime.device",
        ),
        (["train", "{cfg}", "-o", "train.precision=bf16"], "runtime.precision"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tmp_path / "cache")))
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    extra = ["--out", tmp_path / "run"] if args[0] == "train" else []
    done = iopfl(*args, *extra)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and needle in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3  # one message (rich may wrap a long line)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert not (tmp_path / "run" / "results.json").exists()


def test_synth(tmp_path):
    done = iopfl("synth", tmp_path / "syn", "--sites", 3, "--cases", 3, "--size", 32, "--slices", 4)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == [
        "SiteA",
        "SiteB",
        "SiteC",
        "sites.json",
        "splits.json",
    ]


@pytest.mark.slow
def test_train_then_report(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tmp_path / "cache", rounds=2)))
    for seed in (0, 1):
        done = iopfl("train", cfg, "-o", f"seed={seed}", "--out", tmp_path / f"run{seed}")
        assert done.returncode == 0, done.stderr
        assert "personalized" in done.stdout
        assert (tmp_path / f"run{seed}" / "report.md").exists()
    done = iopfl("report", tmp_path / "run0", tmp_path / "run1", "--out", tmp_path / "cmp.md")
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "cmp.md").read_text()
    assert "iopfl / personalized" in table and "±" in table
    r0, r1 = (json.loads((tmp_path / f"run{s}" / "results.json").read_text()) for s in (0, 1))
    mean = 100 * (r0["models"]["global"]["mean"]["dice"] + r1["models"]["global"]["mean"]["dice"]) / 2
    assert f"{mean:.2f} ±" in table
    assert (tmp_path / "cmp.csv").exists() and (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
