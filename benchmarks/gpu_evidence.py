"""The GPU evidence run's Python half (scripts/gpu_evidence.sh drives it; docs/GPU.md).

``pack``: the polyp sites as a compact carry pack — every frame and mask resized to the training grid
(``data.image_size``, 128 px) with the loader's own resize (bilinear images, nearest masks), frames as
JPEG (quality 95, no chroma subsampling), masks as PNG — so the working tree that travels to a GPU
machine stays far below its 64 MiB. Scores of runs on the pack are on that grid, not on each frame's
own size. Without the source folders (``--synthetic``) it writes blob-on-noise frames under the same
site names, for the smoke run.

``quality``: the inside core (IOP-FL, FedBN, Ditto × seeds) on the pack, as records in
benchmarks/bench_quality.py's layout (``OUT/inside/<method>-s<seed>/``), with ``--jobs`` runs sharing
the device and a wall-clock ``--budget``: a run starts only while its expected time still fits, and
runs still going at the budget are stopped (their records are not written; finished ones are kept).

    python benchmarks/gpu_evidence.py pack --source ../shared/data --dest .gpu_pack/polyp-128
    python benchmarks/gpu_evidence.py quality --pack .gpu_pack/polyp-128 --out OUT --budget 210 --jobs 3 \
        --estimate 90 -o runtime.device=cuda -o fl.rounds=20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from bench_quality import inside_design, inside_job, suite_config, write_inside_tables
from PIL import Image
from records import default_work, has_record

from iopfl.data.images2d import any_channel_foreground, pair_files
from iopfl.data.io import read_image, read_mask_rgb, resize_images, resize_masks
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import STRATEGIES

SUITE = "polyp"
SITE_FILES = ("README.txt", "SOURCE.md")  # CVC-ClinicDB's frame→sequence table (keeps its split), provenance
JPEG_QUALITY = 95


def polyp_sites() -> list[str]:
    return list(suite_config(SUITE, []).data.sites)


def resized_frame(image: Path, size: int) -> Image.Image:
    """The frame on the ``size``² training grid with the loader's bilinear resize (before its per-image
    normalisation, which is linear): ``[H, W, 3]`` → ``[size, size, 3]`` uint8."""
    rgb = read_image(image, "RGB").transpose(2, 0, 1)[None].astype(np.float32)
    small = resize_images(rgb, size)[0].transpose(1, 2, 0)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def resized_mask(mask: Path, size: int) -> Image.Image:
    """The foreground mask (any channel > 127) on the ``size``² grid, 0/255."""
    small = resize_masks(any_channel_foreground(read_mask_rgb(mask))[None], size)[0]
    return Image.fromarray(small * np.uint8(255))


def pack_site(source: Path, dest: Path, size: int, frames: int | None) -> int:
    """One site folder (``images/`` + ``masks/``) → ``dest`` at ``size`` px; returns the frames written."""
    pairs = pair_files(source / "images", source / "masks")
    stems = list(pairs)[:frames] if frames else list(pairs)
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for stem in stems:
        image, mask = pairs[stem]
        resized_frame(image, size).save(dest / "images" / f"{stem}.jpg", quality=JPEG_QUALITY, subsampling=0)
        resized_mask(mask, size).save(dest / "masks" / f"{stem}.png")
    for name in SITE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    return len(stems)


def synthetic_site(dest: Path, size: int, frames: int, seed: int) -> int:
    """``frames`` blob-on-noise RGB frames with their masks (the smoke run's stand-in for a site)."""
    rng = np.random.default_rng(seed)
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(frames):
        (cy, cx), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.1, 0.25) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        rgb = rng.normal(100, 25, (size, size, 3)) + 80 * mask[..., None]
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
            dest / "images" / f"f{i:03d}.jpg", quality=JPEG_QUALITY
        )
        Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(dest / "masks" / f"f{i:03d}.png")
    return frames


def pack(source: Path | None, dest: Path, size: int, frames: int | None) -> dict:
    """Every polyp site of ``source`` (or synthetic ones when None) → ``dest``, with ``PACK.json``;
    written beside ``dest`` and renamed, so an interrupted pack leaves no half pack."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for i, site in enumerate(polyp_sites()):
        counts[site] = (
            pack_site(source / site, tmp / site, size, frames)
            if source is not None
            else synthetic_site(tmp / site, size, frames or 8, seed=i)
        )
    info = {
        "source": str(source) if source else "synthetic",
        "image_size": size,
        "frames": counts,
        "images": f"JPEG quality {JPEG_QUALITY}, 4:4:4",
        "masks": "PNG 0/255",
        "note": "scores of runs on this pack are on the image_size² grid, not each frame's own size",
    }
    atomic_write_text(tmp / "PACK.json", json.dumps(info, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return info


def design_order(methods: list[str], seeds: int) -> list[tuple[str, int]]:
    """Seed-major, as bench_quality runs them: every method's seed 0 first, so a short budget still
    ends with whole seeds of the paired comparison."""
    return inside_design(methods, seeds, [], 0)


class Budgeted:
    """Runs ``job(method, seed, *args)`` for (method, seed) pairs, ``jobs`` at a time in spawned
    processes, within ``budget`` seconds."""

    def __init__(self, jobs: int, budget: float, estimate: float, threads: int):
        self.jobs, self.budget, self.estimate = jobs, budget, estimate
        self.pool = multiprocessing.get_context("spawn").Pool(jobs, torch.set_num_threads, (threads,))
        self.t0 = time.perf_counter()
        self.durations: dict[str, list[float]] = {}
        self.log: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def expected(self, method: str) -> float:
        """A method's longest finished run, or the a-priori ``estimate`` before any has finished."""
        return max(self.durations.get(method, [self.estimate]))

    def fits(self, method: str) -> bool:
        return self.elapsed() + self.expected(method) <= self.budget

    def run(self, job: Callable[..., object], design: list[tuple[str, int]], job_args: tuple) -> list[dict]:
        waiting, running = list(design), {}
        while waiting or running:
            for key, (result, start) in list(running.items()):
                if result.ready():
                    del running[key]
                    self.finish(key, start, result)
            while waiting and len(running) < self.jobs and self.fits(waiting[0][0]):
                method, seed = waiting.pop(0)
                running[(method, seed)] = (self.pool.apply_async(job, (method, seed, *job_args)), self.elapsed())
            if self.elapsed() >= self.budget or (waiting and not running and not self.fits(waiting[0][0])):
                break
            time.sleep(0.2)
        self.pool.terminate()  # runs still going at the budget: stopped, no record
        self.log += [
            {"run": f"{m}-s{s}", "status": "stopped at the budget", "started_s": round(t, 1)}
            for (m, s), (_, t) in running.items()
        ]
        self.log += [{"run": f"{m}-s{s}", "status": "not started (budget)"} for m, s in waiting]
        return self.log

    def finish(self, key: tuple[str, int], start: float, result) -> None:
        method, seed = key
        seconds = self.elapsed() - start
        try:
            result.get()
        except Exception as exc:  # noqa: BLE001 — one failed run is reported; the others go on
            self.log.append({"run": f"{method}-s{seed}", "status": f"failed: {exc}", "seconds": round(seconds, 1)})
            return
        self.durations.setdefault(method, []).append(seconds)
        self.log.append({"run": f"{method}-s{seed}", "status": "finished", "seconds": round(seconds, 1)})
        print(f"gpu_evidence: {method}-s{seed} finished in {seconds:.0f} s ({self.elapsed():.0f} s used)", flush=True)


def drop_partial_records(out: Path, log: list[dict]) -> None:
    """A run stopped while its record was being copied leaves an incomplete one: removed."""
    for entry in log:
        record = out / "inside" / entry["run"]
        if entry["status"] == "stopped at the budget" and record.exists() and not has_record(record):
            shutil.rmtree(record)


def quality(args: argparse.Namespace) -> dict:
    """The budgeted inside core on the pack → records, tables and ``OUT/evidence.json``."""
    if not (args.pack / "PACK.json").is_file():
        raise UserError(f"{args.pack / 'PACK.json'}: not found; make the pack with 'scripts/gpu_evidence.sh pack'")
    extra = [f"data.root={args.pack}", *args.override]
    work = args.work or default_work(args.out)
    threads = max(1, (torch.get_num_threads() or 1) // args.jobs)
    runner = Budgeted(args.jobs, args.budget, args.estimate, threads)
    log = runner.run(partial(inside_job, SUITE), design_order(args.methods, args.seeds), (args.out, work, extra))
    drop_partial_records(args.out, log)
    records = write_inside_tables(args.out)
    summary = {
        "budget_s": args.budget,
        "used_s": round(runner.elapsed(), 1),
        "jobs": args.jobs,
        "estimate_s": args.estimate,
        "overrides": extra,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "pack": json.loads((args.pack / "PACK.json").read_text()),
        "runs": log,
        "records": [p.name for p in records],
    }
    atomic_write_text(args.out / "evidence.json", json.dumps(summary, indent=1))
    return summary


def main() -> None:
    try:
        run_command()
    except UserError as exc:
        print(f"gpu_evidence: {exc}", file=sys.stderr)
        sys.exit(2)


def run_command() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="the polyp sites resized to the training grid")
    p.add_argument("--source", type=Path, help="folder holding the polyp site folders (absent: --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="blob frames instead of --source (smoke run)")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--size", type=int, default=128, help="the grid (default: configs/polyp.yaml's 128)")
    p.add_argument("--frames", type=int, help="only the first N frames of each site (smoke run)")
    q = sub.add_parser("quality", help="the inside core on a pack, within a time budget")
    q.add_argument("--pack", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--work", type=Path, help="run folders with weights (default: as bench_quality.py)")
    q.add_argument("--methods", nargs="+", choices=list(STRATEGIES), default=["iopfl", "fedbn", "ditto"])
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--jobs", type=int, default=3, help="runs at a time on the one device")
    q.add_argument("--budget", type=float, required=True, help="seconds; no run is left going past it")
    q.add_argument(
        "--estimate", type=float, required=True, help="expected seconds of a run before one of its method has finished"
    )
    q.add_argument("-o", "--override", action="append", default=[], help="config key=value for every run")
    args = parser.parse_args()
    if args.command == "pack":
        if (args.source is None) == (not args.synthetic):
            parser.error("pack: give --source or --synthetic")
        info = pack(args.source, args.dest, args.size, args.frames)
        print(f"gpu_evidence: packed {sum(info['frames'].values())} frames at {args.size} px into {args.dest}")
    else:
        summary = quality(args)
        print(json.dumps({k: summary[k] for k in ("used_s", "records")}, indent=1))


if __name__ == "__main__":
    main()
