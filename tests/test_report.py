"""``iopfl report``: the table across runs, against hand-computed means and independent of run order."""

import json

import numpy as np

from iopfl.report.compare import compare_runs


def fake_run(path, method, dice_by_site):
    path.mkdir(parents=True)
    sites = {s: {"dice": d, "hd95": 1.0, "assd": 0.5} for s, d in dice_by_site.items()}
    mean = {"dice": float(np.mean(list(dice_by_site.values()))), "hd95": 1.0, "assd": 0.5}
    results = {"method": method, "dataset": "synthetic", "models": {"personalized": {"sites": sites, "mean": mean}}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_report_rows_follow_the_registry_whatever_the_argument_order(tmp_path):
    runs = [
        fake_run(tmp_path / "iopfl-s0", "iopfl", {"A": 0.8, "B": 0.6}),
        fake_run(tmp_path / "iopfl-s1", "iopfl", {"A": 0.9, "B": 0.7}),
        fake_run(tmp_path / "local-s0", "local", {"A": 0.5, "B": 0.5}),
    ]
    compare_runs(runs, tmp_path / "a.md")
    compare_runs(runs[::-1], tmp_path / "b.md")
    table = (tmp_path / "a.md").read_text()
    assert table == (tmp_path / "b.md").read_text()
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert table.index("| local / personalized |") < table.index("| iopfl / personalized |")  # registry order
    # iopfl site A over seeds: mean 85.00, sample std 7.07; mean column: (70 + 80) / 2 = 75.00 ± 7.07
    assert "| iopfl / personalized | 85.00 ± 7.07 | 65.00 ± 7.07 | 75.00 ± 7.07 |" in table


def test_overlay_panel_has_a_legend_the_case_id_and_its_dice():
    from iopfl.report.run_report import overlay_figure

    gt = np.zeros((16, 16), np.uint8)
    gt[4:10, 4:10] = 1
    pred = np.roll(gt, 2, axis=1)
    fig = overlay_figure(
        np.random.default_rng(0).random((16, 16)), gt, pred, "SiteA · Case07", "personalized", {"prostate": 0.6667}
    )
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ground truth", "prediction"]
    title = fig.axes[0].get_title()
    assert "Case07" in title and "personalized · case Dice 66.7%" in title
    several = overlay_figure(np.zeros((16, 16)), gt, pred, "x", "global", {"disc": 0.9, "cup": 0.75})
    assert "case Dice disc 90.0% · cup 75.0%" in several.axes[0].get_title()
    unlabelled = overlay_figure(np.zeros((16, 16)), None, pred, "x", "global")
    assert [t.get_text() for t in unlabelled.legends[0].get_texts()] == ["prediction"]


def test_site_overlay_shows_the_dice_of_the_drawn_case(tmp_path, monkeypatch):
    """The end-of-run overlay's Dice is the case's own, as the metrics score it (original grid)."""
    import torch

    from _tiny import tiny_config
    from iopfl.data import load_dataset
    from iopfl.engine.site import make_client, network_builder, network_description
    from iopfl.evaluation.evaluate import predict_original, score_case
    from iopfl.report import run_report
    from iopfl.runtime import Runtime

    cfg = tiny_config(tmp_path / "cache")
    spec = load_dataset(cfg.data)
    client = make_client(cfg, Runtime.resolve(cfg.runtime), spec, "SiteB", spec.sites["SiteB"], None)
    torch.manual_seed(0)
    model = network_builder(network_description(cfg, spec))().eval()
    drawn = {}
    real = run_report.overlay_figure
    monkeypatch.setattr(run_report, "overlay_figure", lambda *a: drawn.update(args=a) or real(*a))
    path = client.draw_overlay(model.state_dict(), tmp_path / "overlays", "global")
    case = spec.sites["SiteB"].test[0]
    expected = score_case(predict_original(model, case, spec.context, 4), case, spec.regions)["regions"]
    title, label, dice = drawn["args"][3:]
    assert path.is_file() and case.case_id in title and label == "global"
    assert dice == {r: s["dice"] for r, s in expected.items()}
    assert 0 < dice["prostate"] < 1  # a case neither model nor truth makes trivial: a wrong Dice shows
