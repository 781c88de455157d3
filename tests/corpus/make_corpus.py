"""Generate the bad-input corpus: malformed files, trees, configs and checkpoints, each with the
command that must reject it (exit 2, a message naming the file or key) or handle it as documented.

    python tests/corpus/make_corpus.py OUTDIR      # writes OUTDIR/... and OUTDIR/corpus.json

Nothing here is a checked-in blob: every input is made by this script.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from PIL import Image

RNG = np.random.default_rng(0)


def nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.6, 0.6, 3.0, 1.0])), str(path))


def volume_site(site: Path, cases: int = 3, shape=(24, 24, 4), label=True) -> None:
    for c in range(cases):
        image = RNG.normal(100, 20, size=shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        if label:
            mask[6:14, 6:14, :] = 1
        nifti(site / f"Case{c:02d}.nii.gz", image)
        nifti(site / f"Case{c:02d}_segmentation.nii.gz", mask)


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_site(site: Path, n: int = 4) -> None:
    for i in range(n):
        png(site / "images" / f"{i}.png", RNG.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        mask = np.zeros((20, 20), np.uint8)
        mask[4:12, 4:12] = 255
        png(site / "masks" / f"{i}.png", mask)


class Corpus:
    def __init__(self, root: Path):
        self.root = root
        self.entries: list[dict] = []

    def config(self, name: str, tree: dict) -> Path:
        path = self.root / name / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tree))
        return path

    def data_config(self, name: str, source: str, data_root: Path, **data) -> Path:
        tree = {
            "data": {
                "source": source,
                "root": str(data_root),
                "image_size": 16,
                "cache_dir": str(self.root / name / "cache"),
                **data,
            }
        }
        return self.config(name, tree)

    def add(self, name: str, argv: list, needle: str, expect: str = "error") -> None:
        self.entries.append({"name": name, "argv": [str(a) for a in argv], "needle": needle, "expect": expect})

    def volumes(self, name: str, damage) -> None:
        """A prostate-layout tree with one damaged file; `iopfl inspect` must name it."""
        data = self.root / name / "data"
        volume_site(data / "S1")
        needle = damage(data / "S1")
        self.add(name, ["inspect", self.data_config(name, "prostate", data)], needle)

    def images(self, name: str, damage, expect: str = "error") -> None:
        data = self.root / name / "data"
        image_site(data / "A")
        needle = damage(data / "A")
        self.add(name, ["inspect", self.data_config(name, "folder", data)], needle, expect)


def build(root: Path) -> list[dict]:
    c = Corpus(root)

    def zero_bytes(site):
        (site / "Case00.nii.gz").write_bytes(b"")
        return "Case00.nii.gz"

    def truncated(site):
        raw = (site / "Case01.nii.gz").read_bytes()
        (site / "Case01.nii.gz").write_bytes(raw[: len(raw) // 3])
        return "Case01.nii.gz"

    def shape_mismatch(site):
        nifti(site / "Case02_segmentation.nii.gz", np.zeros((24, 24, 3), np.uint8))
        return "Case02_segmentation.nii.gz"

    def four_d(site):
        nifti(site / "Case00.nii.gz", np.zeros((24, 24, 4, 2), np.float32))
        return "Case00.nii.gz"

    def non_finite(site):
        data = np.ones((24, 24, 4), np.float32)
        data[3, 3, 1] = np.inf
        nifti(site / "Case01.nii.gz", data)
        return "Case01.nii.gz"

    def complex_dtype(site):
        nifti(site / "Case02.nii.gz", np.ones((24, 24, 4), np.complex64))
        return "Case02.nii.gz"

    def image_without_mask(site):
        (site / "Case00_segmentation.nii.gz").unlink()
        return "Case00.nii.gz"

    def mask_without_image(site):
        (site / "Case01.nii.gz").unlink()
        return "Case01_segmentation.nii.gz"

    def no_pairs(site):
        for p in site.iterdir():
            p.unlink()
        (site / "notes.txt").write_text("no volumes here")
        return "no site folders found"

    for name, damage in [
        ("nifti-zero-bytes", zero_bytes),
        ("nifti-truncated", truncated),
        ("nifti-shape-mismatch", shape_mismatch),
        ("nifti-4d", four_d),
        ("nifti-non-finite", non_finite),
        ("nifti-complex-dtype", complex_dtype),
        ("nifti-image-without-mask", image_without_mask),
        ("nifti-mask-without-image", mask_without_image),
        ("site-without-pairs", no_pairs),
    ]:
        c.volumes(name, damage)

    # handled as documented: a 1-slice volume (2.5D edges replicate), a constant image (normalises to
    # zeros), labels outside {0, 1} (label > 0 is prostate), a site whose masks are all empty (kept and
    # scored by the empty-mask policy)
    def one_slice(site):
        nifti(site / "Case00.nii.gz", RNG.normal(size=(24, 24, 1)).astype(np.float32))
        nifti(site / "Case00_segmentation.nii.gz", np.ones((24, 24, 1), np.uint8))
        return "S1"

    def constant(site):
        nifti(site / "Case01.nii.gz", np.full((24, 24, 4), 7.0, np.float32))
        return "S1"

    def odd_labels(site):
        nifti(site / "Case02_segmentation.nii.gz", np.full((24, 24, 4), 7, np.uint8))
        return "S1"

    for name, damage in [
        ("nifti-one-slice", one_slice),
        ("nifti-constant-image", constant),
        ("nifti-labels-outside-set", odd_labels),
    ]:
        data = root / name / "data"
        volume_site(data / "S1")
        damage(data / "S1")
        c.add(name, ["inspect", c.data_config(name, "prostate", data)], "S1", expect="ok")
    data = root / "empty-masks-everywhere" / "data"
    volume_site(data / "S1", label=False)
    c.add(
        "empty-masks-everywhere",
        ["inspect", c.data_config("empty-masks-everywhere", "prostate", data)],
        "S1",
        expect="ok",
    )

    def png_zero(site):
        (site / "images" / "0.png").write_bytes(b"")
        return "0.png"

    def png_truncated(site):
        raw = (site / "images" / "1.png").read_bytes()
        (site / "images" / "1.png").write_bytes(raw[:50])
        return "1.png"

    def png_text(site):
        (site / "images" / "2.png").write_text("GIF89a? no: plain text")
        return "2.png"

    def png_size_mismatch(site):
        png(site / "masks" / "3.png", np.zeros((10, 12), np.uint8))
        return "3.png"

    def duplicate_ids(site):
        png(site / "images" / "0.jpg", RNG.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        return "duplicate case id"

    def symlink_loop(site):
        os.symlink(site / "images" / "loop.png", site / "images" / "loop.png")
        png(site / "masks" / "loop.png", np.zeros((20, 20), np.uint8))
        return "loop.png"

    for name, damage in [
        ("png-zero-bytes", png_zero),
        ("png-truncated", png_truncated),
        ("not-an-image-with-png-extension", png_text),
        ("png-mask-size-mismatch", png_size_mismatch),
        ("duplicate-case-ids", duplicate_ids),
        ("symlink-loop", symlink_loop),
    ]:
        c.images(name, damage)

    if os.geteuid() != 0:  # root reads anything: permissions cannot be tested as root

        def unreadable(site):
            (site / "images" / "1.png").chmod(0)
            return "1.png"

        c.images("unreadable-permissions", unreadable)

    # configuration mistakes
    good = root / "good-data"
    volume_site(good / "S1")
    volume_site(good / "S2")
    c.add(
        "unknown-site", ["inspect", c.data_config("unknown-site", "prostate", good, sites=["S1", "Nowhere"])], "Nowhere"
    )
    (good / "splits.json").write_text(
        json.dumps({"splits": {"S1": {"train": ["Case00"], "val": ["Case01"], "test": ["Case77"]}}})
    )
    c.add("split-names-missing-case", ["inspect", c.data_config("split-missing", "prostate", good)], "Case77")
    cfg = c.data_config("config-unknown-key", "prostate", good)
    c.add("config-unknown-key", ["train", cfg, "-o", "fl.learning_rate=1"], "fl.learning_rate")
    c.add("rounds-zero", ["train", cfg, "-o", "fl.rounds=0"], "fl.rounds")
    c.add("rounds-negative", ["train", cfg, "-o", "fl.rounds=-3"], "fl.rounds")
    bad_yaml = root / "bad-yaml" / "config.yaml"
    bad_yaml.parent.mkdir(parents=True)
    bad_yaml.write_text("data: [unclosed\n")
    c.add("config-not-yaml", ["train", bad_yaml], "config.yaml")
    c.add("missing-root", ["inspect", c.data_config("missing-root", "prostate", root / "no-such-root")], "no-such-root")

    # checkpoints: another architecture, truncated, and a pickle payload that would run code
    run = root / "run-template"
    make_run(run, good)
    for name, damage in [
        ("checkpoint-other-architecture", other_architecture),
        ("checkpoint-old-format", old_format),
        ("checkpoint-truncated", truncate_checkpoint),
        ("checkpoint-pickle-payload", pickle_payload),
        ("results-truncated", truncate_results),
        ("results-wrong-type", results_wrong_type),
    ]:
        target = root / name / "run"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.system(f"cp -r '{run}' '{target}'")
        needle = damage(target)
        c.add(
            name,
            ["predict", target, "--site", "S1", good / "S1" / "Case00.nii.gz", "--out", root / name / "out"],
            needle,
        )
    c.add(
        "adapt-empty-target-folder",
        ["adapt", run, "--target", (root / "empty-folder").as_posix(), "--out", root / "adapt-out"],
        "empty-folder",
    )
    (root / "empty-folder").mkdir()
    (root / "corpus.json").write_text(json.dumps(c.entries, indent=1))
    return c.entries


def make_run(run: Path, data: Path) -> None:
    """A minimal finished run directory: config, a checkpoint of the right architecture (untrained
    weights) and both sites' published personalised models."""
    from iopfl.engine.checkpoint import pack, save_run_checkpoint
    from iopfl.results import RunResults, write_results

    run.mkdir(parents=True)
    tree = {"data": {"source": "prostate", "root": str(data), "image_size": 16}, "model": {"width": 4, "depth": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    network = {
        "in_channels": 3,
        "num_classes": 2,
        "context": 1,
        "regions": {"prostate": [1]},
        "image_size": 16,
        "width": 4,
        "depth": 2,
    }
    save_run_checkpoint(
        run / "checkpoints" / "last.safetensors",
        pack("best/global", _weights(4)),
        {"sites": ["S1", "S2"], "network": network, "run_key": "corpus"},
        "inprocess",
        "corpus",
    )
    results = RunResults(method="iopfl", dataset="prostate", models={}, published=["S1", "S2"])
    write_results(run / "results.json", results)
    _publish(run, _weights(4))


def _weights(width: int) -> dict:
    from iopfl.models import build_model

    return build_model(3, 2, width, 2).state_dict()


def _publish(run: Path, weights: dict) -> None:
    from iopfl.engine.checkpoint import save_checkpoint

    for site in ("S1", "S2"):
        save_checkpoint(run / "experts" / f"{site}.safetensors", weights, {"site": site})


def other_architecture(run: Path) -> str:
    _publish(run, _weights(8))  # width 8 where the config says 4
    return "does not match the architecture"


def old_format(run: Path) -> str:
    """A checkpoint as iopfl 0.1 wrote it (format 1, no engine)."""
    from iopfl.engine.checkpoint import load_checkpoint, save_checkpoint

    path = run / "checkpoints" / "last.safetensors"
    tensors, state = load_checkpoint(path)
    save_checkpoint(path, tensors, {**state, "format": 1, "engine": None})
    return "format 1"


def truncate_checkpoint(run: Path) -> str:
    path = run / "checkpoints" / "last.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return "last.safetensors"


def truncate_results(run: Path) -> str:
    path = run / "results.json"
    path.write_text(path.read_text()[:40])
    return "results.json"


def results_wrong_type(run: Path) -> str:
    path = run / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "published": "S1"}))
    return "results.json"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pickle_payload(run: Path) -> str:
    path = run / "checkpoints" / "last.safetensors"
    path.write_bytes(pickle.dumps({"global": _RunsCode()}))
    return "last.safetensors"


if __name__ == "__main__":
    entries = build(Path(sys.argv[1]))
    print(f"{len(entries)} corpus inputs written to {sys.argv[1]}")
