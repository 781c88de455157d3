"""scripts/gpu_evidence.sh: the pack, the budgeted runs, and the whole path on the CPU (``--smoke``)."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_evidence import Budgeted, pack, polyp_sites  # noqa: E402
from records import RECORD_FILES  # noqa: E402

from iopfl.data.images2d import image_to_case, pair_files  # noqa: E402

# the script's own default (configs/polyp.yaml's data.root) unless GPU_EVIDENCE_SOURCE names another
SOURCE = Path(os.environ.get("GPU_EVIDENCE_SOURCE", REPO.parent / "shared" / "data"))
has_polyps = pytest.mark.skipif(
    not (SOURCE / "Kvasir-SEG" / "images").is_dir(), reason=f"{SOURCE} holds no polyp sites"
)


def nap(method: str, seed: int, seconds: dict[str, float]) -> None:
    """A stand-in job that takes ``seconds[method]``."""
    time.sleep(seconds[method])


def test_a_run_still_going_at_the_budget_is_stopped_and_no_other_starts():
    runner = Budgeted(jobs=1, budget=10, estimate=1, threads=1)
    t0 = time.perf_counter()
    log = runner.run(nap, [("slow", 0), ("after", 0)], ({"slow": 600, "after": 0},))
    assert time.perf_counter() - t0 < 20  # stopped at the budget, not waited for
    assert log == [
        {"run": "slow-s0", "status": "stopped at the budget", "started_s": 0.0},
        {"run": "after-s0", "status": "not started (budget)"},
    ]


def test_a_run_whose_expected_time_does_not_fit_is_not_started():
    runner = Budgeted(jobs=1, budget=60, estimate=100, threads=1)
    t0 = time.perf_counter()
    log = runner.run(nap, [("long", 0)], ({"long": 600},))
    assert time.perf_counter() - t0 < 10
    assert log == [{"run": "long-s0", "status": "not started (budget)"}]


def test_synthetic_pack_has_every_site_on_the_grid(tmp_path):
    info = pack(None, tmp_path / "pack", 24, 5)
    assert info["frames"] == {site: 5 for site in polyp_sites()}
    assert json.loads((tmp_path / "pack" / "PACK.json").read_text())["image_size"] == 24
    for site in polyp_sites():
        masks = sorted((tmp_path / "pack" / site / "masks").iterdir())
        assert len(masks) == 5 and len(list((tmp_path / "pack" / site / "images").iterdir())) == 5
        mask = np.asarray(Image.open(masks[0]))
        assert mask.shape == (24, 24) and set(np.unique(mask)) <= {0, 255}
    assert not list(tmp_path.glob(".*.tmp"))  # written beside and renamed


@has_polyps
@pytest.mark.realdata
def test_pack_keeps_the_loaders_training_grid(tmp_path):
    """A packed frame loads to the same training mask as its original, and to nearly the same image
    (JPEG and the per-image normalisation on the small grid differ slightly)."""
    pack(SOURCE, tmp_path / "pack", 64, 3)
    site = "CVC-ClinicDB_jpg"
    assert (tmp_path / "pack" / site / "README.txt").is_file()  # its sequences keep the split
    original = pair_files(SOURCE / site / "images", SOURCE / site / "masks")
    packed = pair_files(tmp_path / "pack" / site / "images", tmp_path / "pack" / site / "masks")
    for stem in packed:
        a, b = image_to_case(site, stem, *original[stem], 64), image_to_case(site, stem, *packed[stem], 64)
        assert np.array_equal(a.mask, b.mask)
        assert np.abs(a.image - b.image).mean() < 0.1


def test_quality_without_a_pack_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_evidence.py"),
            "quality",
            "--pack",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--budget",
            "60",
            "--estimate",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "PACK.json" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_run_writes_records_in_the_benchmark_layout(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_EVIDENCE_SOURCE": str(SOURCE)}
    done = subprocess.run(
        [str(REPO / "scripts" / "gpu_evidence.sh"), "--smoke", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "results" / "quality-polyp-gpu"
    for run in ("iopfl-s0", "fedbn-s0", "ditto-s0"):
        assert all((out / "inside" / run / name).is_file() for name in RECORD_FILES), run
    assert (out / "inside.md").is_file() and (out / "inside-paired.md").is_file()
    evidence = json.loads((out / "evidence.json").read_text())
    assert [r["status"] for r in evidence["runs"]] == ["finished"] * 3
    assert evidence["pack"]["image_size"] == 32
    with tarfile.open(tmp_path / "gpu-evidence.tar.gz") as tar:
        assert "results/quality-polyp-gpu/inside/ditto-s0/results.json" in tar.getnames()
