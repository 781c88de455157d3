"""Metrics on hand-made masks, including the empty-mask policy."""

import math

import numpy as np
import pytest

from iopfl.evaluation.metrics import case_metrics, diagonal_mm, reference_dice, summarize_cases, summarize_sites

FG = {"fg": [1]}


def vol(shape, *boxes):
    v = np.zeros(shape, np.uint8)
    for box in boxes:
        v[box] = 1
    return v


def test_dice_of_overlapping_squares():
    a = vol((1, 10, 10), np.s_[0, 0:4, 0:4])  # 16 pixels
    b = vol((1, 10, 10), np.s_[0, 2:6, 0:4])  # 16 pixels, overlap 8
    m = case_metrics(a, b, FG, (1, 1, 1))["fg"]
    assert m["dice"] == pytest.approx(2 * 8 / 32)


def test_distances_honour_anisotropic_spacing():
    # a box shifted by 2 slices along z: with 3 mm slices the farthest surface points are 6 mm apart
    a = vol((12, 12, 12), np.s_[2:6, 3:9, 3:9])
    b = vol((12, 12, 12), np.s_[4:8, 3:9, 3:9])
    iso = case_metrics(a, b, FG, (1, 1, 1))["fg"]
    aniso = case_metrics(a, b, FG, (3, 1, 1))["fg"]
    assert iso["hd95"] == pytest.approx(2.0)
    assert aniso["hd95"] == pytest.approx(6.0)
    assert iso["assd"] == pytest.approx(naive_assd(a, b, (1, 1, 1)), rel=1e-5)
    assert aniso["assd"] == pytest.approx(naive_assd(a, b, (3, 1, 1)), rel=1e-5)


def naive_assd(a, b, spacing):
    """Reference: surfaces = mask minus its erosion; exact Euclidean distances by brute force."""
    from scipy import ndimage

    def surface_points(m):
        edge = m.astype(bool) & ~ndimage.binary_erosion(m.astype(bool))
        return np.argwhere(edge) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return (d.min(1).sum() + d.min(0).sum()) / (len(pa) + len(pb))


def test_identical_masks():
    a = vol((3, 8, 8), np.s_[1, 2:5, 2:5])
    assert case_metrics(a, a.copy(), FG, (2, 1, 1))["fg"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}


def test_both_empty():
    z = np.zeros((2, 8, 8), np.uint8)
    assert case_metrics(z, z, FG, (1, 1, 1))["fg"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty_scores_the_diagonal(empty_side):
    full = vol((2, 8, 6), np.s_[0, 2:4, 2:4])
    empty = np.zeros_like(full)
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    m = case_metrics(pred, gt, FG, (3, 0.5, 2))["fg"]
    diag = math.sqrt((2 * 3) ** 2 + (8 * 0.5) ** 2 + (6 * 2) ** 2)
    assert m == {"dice": 0.0, "hd95": pytest.approx(diag), "assd": pytest.approx(diag)}
    assert diagonal_mm((1, 8, 6), (1, 1, 1)) == pytest.approx(10.0)  # 2D: in-plane only


def test_nested_regions():
    gt = np.zeros((1, 10, 10), np.uint8)
    gt[0, 2:8, 2:8] = 1
    gt[0, 4:6, 4:6] = 2
    pred = gt.copy()
    pred[0, 4:6, 4:6] = 1  # cup missed, disc right
    m = case_metrics(pred, gt, {"disc": [1, 2], "cup": [2]}, (1, 1, 1))
    assert m["disc"]["dice"] == 1.0 and m["cup"]["dice"] == 0.0


def test_reference_dice_by_hand():
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2, :2] = 1  # slice 0: 4 fg pixels
    pred = np.zeros_like(gt)
    pred[0, :2, :1] = 1  # 2 of them found
    # slice 0: fg dice 2·2/(2+4) = 2/3; bg dice 2·12/(14+12) = 12/13; slice 1: both empty → (1 + 1)/2
    expected = ((2 / 3 + 12 / 13) / 2 + 1.0) / 2
    assert reference_dice(pred, gt) == pytest.approx(expected)


def test_summaries():
    cases = [
        {
            "case": "a",
            "regions": {"r1": {"dice": 0.5, "hd95": 2.0, "assd": 1.0}, "r2": {"dice": 1.0, "hd95": 0.0, "assd": 0.0}},
            "ref_dice": 0.8,
        },
        {
            "case": "b",
            "regions": {"r1": {"dice": 0.0, "hd95": 4.0, "assd": 2.0}, "r2": {"dice": 0.5, "hd95": 2.0, "assd": 1.0}},
            "ref_dice": 0.6,
        },
    ]
    s = summarize_cases(cases)
    assert s["n"] == 2 and s["dice"] == pytest.approx(0.5) and s["hd95"] == pytest.approx(2.0)
    assert s["regions"]["r1"]["dice"] == pytest.approx(0.25) and s["ref_dice"] == pytest.approx(0.7)
    overall = summarize_sites([s, {**s, "dice": 1.0}, summarize_cases([])])
    assert overall["dice"] == pytest.approx(0.75)
    other = summarize_cases(
        [
            {
                **cases[0],
                "regions": {
                    "r1": {"dice": 1.0, "hd95": 0.0, "assd": 0.0},
                    "r2": {"dice": 0.0, "hd95": 8.0, "assd": 4.0},
                },
            }
        ]
    )
    both = summarize_sites([s, other])  # per region: the mean over sites of each site's region mean
    assert both["regions"]["r1"]["dice"] == pytest.approx((0.25 + 1.0) / 2)
    assert both["regions"]["r2"]["hd95"] == pytest.approx((1.0 + 8.0) / 2)


def test_regions_table_lists_each_region_when_there_are_several():
    from iopfl.report.tables import regions_table
    from iopfl.results import ModelEntry

    def entry(regions: dict[str, float]) -> ModelEntry:
        site = {
            "dice": 0.5,
            "hd95": 1.0,
            "assd": 0.5,
            "regions": {r: {"dice": d, "hd95": 1.0, "assd": 0.5} for r, d in regions.items()},
        }
        return ModelEntry.model_validate({"sites": {"D1": site}, "mean": site})

    table = regions_table({"personalized": entry({"disc": 0.8, "cup": 0.2})})
    assert "| personalized | disc | 80.00 | 80.00 |" in table and "| personalized | cup | 20.00 | 20.00 |" in table
    assert regions_table({"m": entry({"fg": 0.5})}) == ""


@pytest.mark.parametrize("shape,spacing", [((1, 40, 48), (1.0, 0.7, 1.3)), ((9, 20, 24), (3.0, 1.0, 0.8))])
def test_distances_match_monai_reference_functions(shape, spacing):
    """One shared surface-distance pass gives MONAI's own HD95 and symmetric ASSD."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(3)
    a, b = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5 for _ in range(2))
    ours = case_metrics(a.astype(np.uint8), b.astype(np.uint8), FG, spacing)["fg"]
    squeeze = shape[0] == 1
    ta, tb = (torch.from_numpy(m[0] if squeeze else m)[None, None].float() for m in (a, b))
    sp = spacing[1:] if squeeze else spacing
    hd95 = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=sp).item()
    assd = compute_average_surface_distance(ta, tb, include_background=True, symmetric=True, spacing=sp).item()
    assert ours["hd95"] == pytest.approx(hd95, rel=1e-6)
    assert ours["assd"] == pytest.approx(assd, rel=1e-6)
