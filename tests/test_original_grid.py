"""Scoring on each input's original grid: upsampled probabilities against original-resolution labels,
and masks written at each input's own size."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iopfl.data import Case, load_dataset
from iopfl.data.base import PackedMask
from iopfl.data.cache import _decode, _encode
from iopfl.data.images2d import image_to_case
from iopfl.evaluation.evaluate import labels_on_original_grid, score_case
from iopfl.evaluation.metrics import case_metrics

FG = {"fg": [1]}


def naive_bilinear(plane: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``F.interpolate(..., mode="bilinear", align_corners=False)`` of one ``[h, w]`` plane, written out:
    source coordinate (dst + ½)·scale − ½ clamped at 0, neighbours clamped at the last pixel."""
    h, w = plane.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = int(math.floor(y))
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(out_w):
            x = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = int(math.floor(x))
            x1 = min(x0 + 1, w - 1)
            fx = x - x0
            top = plane[y0, x0] * (1 - fx) + plane[y0, x1] * fx
            bottom = plane[y1, x0] * (1 - fx) + plane[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def _case(original: np.ndarray, size: int) -> Case:
    """A 2D case whose original labels ``[1, H0, W0]`` differ in size from its ``size²`` training grid."""
    from iopfl.data.io import resize_masks

    resized = resize_masks(original, size)
    return Case(
        "s",
        "c",
        np.zeros((1, 3, size, size), np.float32),
        resized,
        (1.0, 1.0, 1.0),
        "c.png",
        {"format": "image", "shape": list(original.shape[1:])},
        PackedMask.pack(original),
    )


def test_scores_on_the_original_grid_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    truth = np.zeros((1, 30, 44), np.uint8)
    truth[0, 8:21, 12:33] = 1
    case = _case(truth, 16)
    fg = np.clip(rng.random((16, 16)) * 0.4 + np.pad(np.full((6, 9), 0.6), ((5, 5), (4, 3))), 0, 1)
    probs = torch.from_numpy(np.stack([1 - fg, fg])[None]).float()  # [1, 2, 16, 16]

    pred = labels_on_original_grid(probs, case)
    up = [naive_bilinear(p, 30, 44) for p in probs[0].double().numpy()]
    by_hand = (up[1] > up[0]).astype(np.uint8)
    assert pred.shape == (1, 30, 44)
    assert (pred[0] != by_hand).sum() <= 2  # float32 vs float64 rounding exactly at p = ½ at most

    scores = score_case(pred, case, FG)["regions"]["fg"]
    p, t = pred[0].astype(bool), truth[0].astype(bool)
    assert scores["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    from test_metrics import naive_assd

    assert scores["assd"] == pytest.approx(naive_assd(pred[0], truth[0], (1, 1)), rel=1e-5)

    on_training_grid = case_metrics(probs.argmax(1).to(torch.uint8).numpy(), case.mask, FG, (1, 1, 1))["fg"]
    assert on_training_grid["dice"] != pytest.approx(scores["dice"], abs=1e-3)
    assert on_training_grid["hd95"] != pytest.approx(scores["hd95"], abs=1e-3)


def test_empty_mask_policy_uses_the_original_diagonal():
    truth = np.zeros((1, 30, 40), np.uint8)
    case = _case(truth, 16)
    pred = np.zeros((1, 30, 40), np.uint8)
    assert score_case(pred, case, FG)["regions"]["fg"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    pred[0, 3:6, 3:6] = 1
    assert score_case(pred, case, FG)["regions"]["fg"] == {"dice": 0.0, "hd95": 50.0, "assd": 50.0}


def test_packed_masks_round_trip_through_the_cache():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, (2, 7, 13)).astype(np.uint8)  # 3 classes, 182 px: not a byte multiple
    packed = PackedMask.pack(classes)
    assert len(packed.planes) == 2 and np.array_equal(packed.unpack(), classes)
    case = Case(
        "s",
        "c",
        np.zeros((2, 1, 4, 4), np.float32),
        np.zeros((2, 4, 4), np.uint8),
        (3.0, 2.0, 1.5),
        "c.nii.gz",
        {"format": "nifti", "shape": [7, 13, 2]},
        packed,
        (3.0, 0.5, 0.5),
    )
    arrays = {k: np.asarray(v) for k, v in _encode([case]).items()}
    back = _decode(arrays)[0]
    assert np.array_equal(back.truth(), classes) and back.grid_spacing() == (3.0, 0.5, 0.5)
    assert back.original_size == (7, 13)


def test_a_resized_image_keeps_its_labels_at_its_own_size(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (37, 51, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    mask = np.zeros((37, 51), np.uint8)
    mask[10:20, 5:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    case = image_to_case("s", "i", tmp_path / "i.png", tmp_path / "m.png", 32)
    assert case.mask.shape == (1, 32, 32) and case.original_size == (37, 51)
    assert np.array_equal(case.truth()[0], (mask > 127).astype(np.uint8))
    square = np.zeros((32, 32), np.uint8)
    Image.fromarray(square).save(tmp_path / "m32.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "i32.png")
    assert image_to_case("s", "i", tmp_path / "i32.png", tmp_path / "m32.png", 32).original_mask is None


def test_a_volume_is_scored_in_mm_on_its_own_grid(tmp_path):
    """A 20×24×5 volume (0.5 × 0.5 × 3 mm) trained at 16²: a prediction equal to the truth on the
    original grid scores Dice 1 / 0 mm, and a one-voxel shift along x scores 0.5 mm."""
    import nibabel as nib

    from iopfl.data.prostate import volume_to_case

    label = np.zeros((20, 24, 5), np.uint8)
    label[5:12, 6:14, 1:4] = 1
    for name, array in (("Case00", np.random.default_rng(0).normal(size=label.shape)), ("Case00_seg", label)):
        nib.save(
            nib.Nifti1Image(array.astype(np.float32), np.diag([0.5, 0.5, 3.0, 1.0])), str(tmp_path / f"{name}.nii.gz")
        )
    case = volume_to_case("s", "Case00", tmp_path / "Case00.nii.gz", tmp_path / "Case00_seg.nii.gz", 16)
    assert case.mask.shape == (5, 16, 16) and case.original_size == (20, 24)
    assert case.grid_spacing() == (3.0, 0.5, 0.5) and case.spacing != case.grid_spacing()
    truth = np.moveaxis(label, 2, 0)  # [Z, X, Y]
    assert np.array_equal(case.truth(), truth)
    assert score_case(truth.copy(), case, FG)["regions"]["fg"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    shifted = np.roll(truth, 1, axis=2)
    assert score_case(shifted, case, FG)["regions"]["fg"]["hd95"] == pytest.approx(0.5)


# --- end to end: a folder dataset of images of differing sizes ---------------------------------------

SIZES = [(40, 52), (36, 36), (48, 40), (30, 58), (44, 44), (52, 34)]


def disc_site(root: Path, name: str, n: int, seed: int) -> Path:
    """A site folder (images/ + masks/) of ``n`` images of differing sizes, each a bright disc on noise."""
    rng = np.random.default_rng(seed)
    for d in ("images", "masks"):
        (root / name / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image = rng.normal(60, 20, (h, w, 3)) + disc[..., None] * np.array([120, 80, 60])
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / "images" / f"{i:02d}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / name / "masks" / f"{i:02d}.png")
    return root / name


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    from iopfl.config import build_config
    from iopfl.engine.local import in_process_run

    root = tmp_path_factory.mktemp("grid")
    for k, name in enumerate(("A", "B", "C")):
        disc_site(root / "data", name, 10, k)
    cfg = build_config(
        {
            "data": {
                "source": "folder",
                "root": str(root / "data"),
                "image_size": 32,
                "cache_dir": str(root / "cache"),
                "holdout": "C",
            },
            "model": {"width": 8, "depth": 2},
            "fl": {"method": "iopfl", "rounds": 3},
            "train": {"batch_size": 4, "lr": 0.01},
            "eval": {"overlays": 0},
        }
    )
    results = in_process_run(cfg, root / "run").run()
    return cfg, root, results


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.slow
def test_predicted_masks_have_each_inputs_size_and_the_reported_dice(folder_run, tmp_path):
    from iopfl.commands.predict import run_predict

    cfg, root, results = folder_run
    assert results["grid"] == "original"
    test_cases = load_dataset(cfg.data).sites["A"].test
    sizes = {tuple(c.original_size) for c in test_cases}
    assert len(sizes) > 1  # the test split really mixes sizes
    written = run_predict(root / "run", "A", [Path(c.source) for c in test_cases], tmp_path / "pred", "personalized")
    dice = []
    for case, path in zip(test_cases, written, strict=True):
        out = np.asarray(Image.open(path)) > 127
        truth = np.asarray(Image.open(Path(case.source).parents[1] / "masks" / Path(case.source).name)) > 127
        assert out.shape == truth.shape == case.original_size
        dice.append(_dice(out, truth))
    reported = results["models"]["personalized"]["sites"]["A"]["dice"]
    assert 100 * np.mean(dice) == pytest.approx(100 * reported, abs=0.5)


@pytest.mark.slow
def test_adapt_to_a_site_folder_scores_every_method(folder_run, tmp_path):
    from iopfl.commands.adapt import run_adapt

    cfg, root, _ = folder_run
    results = run_adapt(root / "run", str(root / "data" / "C"), "all", tmp_path / "out", [])
    assert set(results.models) == {"global", "bn", "tent", "ensemble", "iopfl"}
    for entry in results.models.values():
        assert entry.sites["C"].n == 10 and 0 <= entry.sites["C"].dice <= 1
    for i in range(10):
        written = np.asarray(Image.open(tmp_path / "out" / "iopfl" / f"{i:02d}.png"))
        assert written.shape == SIZES[i % len(SIZES)]
    # the same site through the dataset (its name as --target) scores the same
    by_name = run_adapt(root / "run", "C", "global", tmp_path / "out2", [])
    assert by_name.models["global"].mean.dice == pytest.approx(results.models["global"].mean.dice)
