"""Data sources on tiny generated trees, bad inputs, the cache, and the real samples when present."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from iopfl.data import Case, DataConfig, SliceDataset, case_inputs, load_dataset, load_unlabelled
from iopfl.data.synthetic import generate_synthetic
from iopfl.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cfg(tmp_path, source, root, **kw) -> DataConfig:
    return DataConfig(
        source=source, root=str(root), image_size=kw.pop("image_size", 32), cache_dir=str(tmp_path / "cache"), **kw
    )


def write_nifti(path: Path, array: np.ndarray, spacing=(0.5, 0.5, 3.0)) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def prostate_tree(root: Path, sites=("S1", "S2"), cases=4, shape=(20, 24, 5)) -> Path:
    rng = np.random.default_rng(0)
    for s in sites:
        (root / s).mkdir(parents=True)
        for c in range(cases):
            image = rng.normal(100, 20, size=shape).astype(np.float32)
            label = np.zeros(shape, np.uint8)
            label[5:12, 6:14, 1:4] = 1
            write_nifti(root / s / f"Case{c:02d}.nii.gz", image)
            write_nifti(root / s / f"Case{c:02d}_segmentation.nii.gz", label)
    return root


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def polyp_tree(root: Path, sites=("A", "B"), n=5, size=(30, 40)) -> Path:
    rng = np.random.default_rng(1)
    for s in sites:
        for i in range(n):
            png(root / s / "images" / f"{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            mask = np.zeros((*size, 3), np.uint8)
            mask[5:15, 10:20, 0] = 255  # a red mask (BKAI-IGH style) is foreground too
            png(root / s / "masks" / f"{i}.png", mask)
    return root


# --- sources ------------------------------------------------------------------------------------


def test_prostate_loader(tmp_path):
    root = prostate_tree(tmp_path / "saml")
    spec = load_dataset(cfg(tmp_path, "prostate", root))
    assert list(spec.sites) == ["S1", "S2"] and spec.in_channels == 3 and spec.context == 1
    site = spec.sites["S1"]
    assert len(site.train) + len(site.val) + len(site.test) == 4 and site.val and site.test
    case = site.train[0]
    assert case.image.shape == (5, 1, 32, 32) and case.mask.shape == (5, 32, 32)
    assert case.spacing == pytest.approx((3.0, 0.5 * 20 / 32, 0.5 * 24 / 32))
    assert abs(case.image.mean()) < 0.1  # z-scored
    assert case.mask.max() == 1 and case.meta["shape"] == [20, 24, 5]


def test_split_file_is_used_and_checked(tmp_path):
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    splits = {"S1": {"train": ["Case00", "Case01"], "val": ["Case02"], "test": ["Case03"]}}
    (root / "splits.json").write_text(json.dumps({"splits": splits}))
    site = load_dataset(cfg(tmp_path, "prostate", root)).sites["S1"]
    assert [c.case_id for c in site.train] == ["Case00", "Case01"] and site.test[0].case_id == "Case03"
    splits["S1"]["test"] = ["Case09"]
    (root / "splits.json").write_text(json.dumps({"splits": splits}))
    with pytest.raises(UserError, match="Case09"):
        load_dataset(cfg(tmp_path, "prostate", root))


def test_folder_loader_flat_and_split_layouts(tmp_path):
    spec = load_dataset(cfg(tmp_path, "folder", polyp_tree(tmp_path / "polyp")))
    a = spec.sites["A"]
    assert len(a.all_cases()) == 5 and a.val and a.test
    case = a.all_cases()[0]
    assert case.image.shape == (1, 3, 32, 32) and case.mask.sum() > 0 and case.meta["shape"] == [30, 40]
    root = tmp_path / "slices"
    for split in ("train", "test"):
        for i in range(3):
            png(root / "X" / split / "image" / f"{i}.png", np.full((16, 16), 50 * i, np.uint8))
            png(root / "X" / split / "mask" / f"{i}.png", np.eye(16, dtype=np.uint8) * 255)
    x = load_dataset(cfg(tmp_path, "folder", root)).sites["X"]
    assert (len(x.train), len(x.val), len(x.test)) == (2, 1, 3)
    assert not np.isnan(x.train[0].image).any()  # constant images normalise to zeros, not NaN


def test_cvc_sequences_never_cross_splits(tmp_path):
    root = polyp_tree(tmp_path / "p", sites=("CVC",), n=12)
    (root / "CVC" / "README.txt").write_text("| 1 to 4 | 1 |\n| 5 to 8 | 2 |\n| 9 to 12 | 3 |\n")
    for i in reversed(range(12)):  # frames are numbered from 1 in CVC-ClinicDB
        for kind in ("images", "masks"):
            (root / "CVC" / kind / f"{i}.png").rename(root / "CVC" / kind / f"{i + 1}.png")
    site = load_dataset(cfg(tmp_path, "folder", root, val_fraction=0.34, test_fraction=0.34)).sites["CVC"]
    seq = lambda c: (int(c.case_id) - 1) // 4  # noqa: E731
    groups = [{seq(c) for c in part} for part in (site.train, site.val, site.test)]
    assert all(g for g in groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_fundus_loader(tmp_path):
    root = tmp_path / "fundus"
    mask = np.full((20, 20), 255, np.uint8)
    mask[4:16, 4:16] = 128
    mask[8:12, 8:12] = 0
    for split in ("train", "test"):
        for i in range(3):
            d = root / "Domain1" / split / "ROIs"
            png(d / "image" / f"g{i}.png", np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8))
            png(d / "mask" / f"g{i}.png", np.stack([mask] * 3, -1))
    spec = load_dataset(cfg(tmp_path, "fundus", root, image_size=16))
    site = spec.sites["Domain1"]
    assert spec.num_classes == 3 and spec.regions == {"disc": [1, 2], "cup": [2]}
    assert (len(site.train), len(site.val), len(site.test)) == (2, 1, 3)
    m = site.test[0].mask[0]
    assert set(np.unique(m)) == {0, 1, 2} and m[8, 8] == 2 and m[0, 0] == 0


def test_synthetic_is_deterministic_and_sites_differ(tmp_path):
    a = generate_synthetic(tmp_path / "a", sites=3, cases=3, size=32, slices=4, seed=5)
    b = generate_synthetic(tmp_path / "b", sites=3, cases=3, size=32, slices=4, seed=5)
    for f in sorted(a.rglob("*.nii.gz")):
        assert np.array_equal(nib.load(str(f)).get_fdata(), nib.load(str(b / f.relative_to(a))).get_fdata())
    means = [nib.load(str(a / s / "Case00.nii.gz")).get_fdata().mean() for s in ("SiteA", "SiteB", "SiteC")]
    assert len({round(m) for m in means}) == 3
    with pytest.raises(UserError, match="not empty"):
        generate_synthetic(a, sites=3, cases=3, size=32, slices=4)


def test_two_and_a_half_d_stacking_replicates_edges():
    volume = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 1, 2, 2), np.float32)
    case = Case("s", "c", volume, np.zeros((4, 2, 2), np.uint8), (1, 1, 1), "x")
    inputs = case_inputs(case, 1)
    assert inputs.shape == (4, 3, 2, 2)
    assert inputs[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    ds = SliceDataset([case], 1)
    assert all(torch.equal(ds[i][0], inputs[i]) for i in range(4))
    images, masks = ds.tensors()
    assert torch.equal(images, inputs) and masks.shape == (4, 2, 2)


def test_cache_hit_skips_the_sources_and_damage_rebuilds(tmp_path, monkeypatch):
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    first = load_dataset(cfg(tmp_path, "prostate", root))
    import iopfl.data.prostate as prostate

    monkeypatch.setattr(prostate, "read_nifti", lambda *a: pytest.fail("cache miss"))
    second = load_dataset(cfg(tmp_path, "prostate", root))
    assert np.array_equal(first.sites["S1"].train[0].image, second.sites["S1"].train[0].image)
    monkeypatch.undo()
    for entry in (tmp_path / "cache").glob("*.npz"):
        entry.write_bytes(b"garbage")
    third = load_dataset(cfg(tmp_path, "prostate", root))
    assert np.array_equal(first.sites["S1"].train[0].image, third.sites["S1"].train[0].image)


# --- bad inputs -----------------------------------------------------------------------------------


def _prostate_problem(root: Path, problem: str) -> str:
    """Damage a good tree; return the file name the error must mention."""
    s1 = root / "S1"
    if problem == "image-without-mask":
        (s1 / "Case00_segmentation.nii.gz").unlink()
        return "Case00.nii.gz"
    if problem == "mask-without-image":
        (s1 / "Case01.nii.gz").unlink()
        return "Case01_segmentation.nii.gz"
    if problem == "shape-mismatch":
        write_nifti(s1 / "Case02_segmentation.nii.gz", np.zeros((20, 24, 4), np.uint8))
        return "Case02_segmentation.nii.gz"
    if problem == "non-finite":
        data = np.ones((20, 24, 5), np.float32)
        data[0, 0, 0] = np.nan
        write_nifti(s1 / "Case03.nii.gz", data)
        return "Case03.nii.gz"
    if problem == "truncated":
        raw = (s1 / "Case00.nii.gz").read_bytes()
        (s1 / "Case00.nii.gz").write_bytes(raw[: len(raw) // 2])
        return "Case00.nii.gz"
    if problem == "zero-bytes":
        (s1 / "Case01.nii.gz").write_bytes(b"")
        return "Case01.nii.gz"
    raise AssertionError(problem)


@pytest.mark.parametrize(
    "problem", ["image-without-mask", "mask-without-image", "shape-mismatch", "non-finite", "truncated", "zero-bytes"]
)
def test_bad_volumes_name_the_file(tmp_path, problem):
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    name = _prostate_problem(root, problem)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_dataset(cfg(tmp_path, "prostate", root))


def _misplaced_mask(root: Path, problem: str) -> Path:
    """Case02's mask with the right shape on another voxel grid."""
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    if problem == "spacing":
        affine[0, 0] = 0.6
    elif problem == "origin":
        affine[:3, 3] = [2.0, 0.0, 0.0]
    else:  # direction: the first axis flipped (same spacing: the norm of the column is unchanged)
        affine[0, 0] = -0.5
    label = np.asarray(nib.load(str(root / "S1" / "Case02_segmentation.nii.gz")).dataobj)
    path = root / "S1" / "Case02_segmentation.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path


@pytest.mark.parametrize("problem, says", [("spacing", "spacing"), ("origin", "origin"), ("direction", "direction")])
def test_a_mask_off_its_images_grid_is_refused(tmp_path, problem, says):
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    _misplaced_mask(root, problem)
    with pytest.raises(
        UserError,
        match=rf"Case02_segmentation\.nii\.gz: does not lie on the voxel grid of its image "
        rf".*Case02\.nii\.gz: {says}",
    ):
        load_dataset(cfg(tmp_path, "prostate", root))


def test_a_mask_within_the_grid_tolerance_is_accepted(tmp_path):
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    path = root / "S1" / "Case02_segmentation.nii.gz"
    affine = np.diag([0.5 * (1 + 1e-5), 0.5, 3.0, 1.0])
    affine[:3, 3] = [1e-4, 0.0, 0.0]  # rounding of another tool's header writer
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), affine), str(path))
    assert load_dataset(cfg(tmp_path, "prostate", root)).sites["S1"]


def test_cli_train_refuses_a_misplaced_mask_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    root = prostate_tree(tmp_path / "saml", sites=("S1", "S2"))
    _misplaced_mask(root, "origin")
    run, config = tmp_path / "run", tmp_path / "c.yaml"
    config.write_text(f"data: {{source: prostate, root: {root}, cache_dir: {tmp_path / 'cache'}, image_size: 16}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "iopfl.cli", "train", str(config), "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "does not lie on the voxel grid" in done.stderr and "Traceback" not in done.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    "problem", ["image-without-mask", "mask-without-image", "size-mismatch", "not-an-image", "truncated"]
)
def test_bad_images_name_the_file(tmp_path, problem):
    root = polyp_tree(tmp_path / "polyp", sites=("A",))
    a = root / "A"
    if problem == "image-without-mask":
        (a / "masks" / "0.png").unlink()
        name = "0.png"
    elif problem == "mask-without-image":
        (a / "images" / "1.png").unlink()
        name = "1.png"
    elif problem == "size-mismatch":
        png(a / "masks" / "2.png", np.zeros((10, 10), np.uint8))
        name = "2.png"
    elif problem == "not-an-image":
        (a / "images" / "3.png").write_text("this is text, not a PNG")
        name = "3.png"
    else:
        raw = (a / "images" / "4.png").read_bytes()
        (a / "images" / "4.png").write_bytes(raw[:60])
        name = "4.png"
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_dataset(cfg(tmp_path, "folder", root))


def test_missing_root_and_sites(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load_dataset(cfg(tmp_path, "prostate", tmp_path / "nowhere"))
    root = prostate_tree(tmp_path / "saml", sites=("S1",))
    with pytest.raises(UserError, match="S9"):
        load_dataset(cfg(tmp_path, "prostate", root, sites=["S9"]))
    (root / "Empty").mkdir()
    with pytest.raises(UserError, match="Empty"):
        load_dataset(cfg(tmp_path, "prostate", root, sites=["Empty"]))
    with pytest.raises(UserError, match="data.root"):
        load_dataset(DataConfig(source="folder", cache_dir=str(tmp_path)))
    with pytest.raises(UserError, match="no images"):
        (tmp_path / "nothing").mkdir()
        load_unlabelled(tmp_path / "nothing", 32)


# --- the real samples in ../shared/data --------------------------------------------------------------

realdata = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


@realdata
@pytest.mark.realdata
def test_real_prostate_slice_sample(tmp_path):
    root = SHARED / "prostate_saml_slices_sample"
    spec = load_dataset(cfg(tmp_path, "folder", root, sites=["BIDMC", "HK", "UCL", "RUNMC", "BMC"]))
    for site in spec.sites.values():
        assert len(site.test) == 3 and site.test[0].mask.any()
    # I2CVB/train is inconsistent at the source (images 00_01..03, masks 00_00..02): a clear error
    with pytest.raises(UserError, match="I2CVB"):
        load_dataset(cfg(tmp_path, "folder", root, sites=["I2CVB"]))


@realdata
@pytest.mark.realdata
def test_real_fundus_sample(tmp_path):
    spec = load_dataset(cfg(tmp_path, "fundus", SHARED / "fundus_dofe_sample", image_size=64))
    assert list(spec.sites) == ["Domain1", "Domain2", "Domain3", "Domain4"]
    for site in spec.sites.values():
        assert len(site.test) == 3
        mask = site.test[0].mask
        assert (mask == 2).any() and (mask >= 1).sum() > (mask == 2).sum()  # cup inside a larger disc


@realdata
@pytest.mark.realdata
@pytest.mark.parametrize("site", ["Kvasir-SEG", "CVC-ClinicDB_jpg", "BKAI-IGH_NeoPolyp-Small_subset200"])
def test_real_polyp_sites(tmp_path, site):
    spec = load_dataset(cfg(tmp_path, "folder", SHARED, sites=[site], max_cases_per_site=12))
    cases = spec.sites[site].all_cases()
    assert len(cases) == 12
    assert all(c.mask.any() for c in cases)
    assert all(c.image.shape == (1, 3, 32, 32) for c in cases)
