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
    runs = [fake_run(tmp_path / "iopfl-s0", "iopfl", {"A": 0.8, "B": 0.6}),
            fake_run(tmp_path / "iopfl-s1", "iopfl", {"A": 0.9, "B": 0.7}),
            fake_run(tmp_path / "local-s0", "local", {"A": 0.5, "B": 0.5})]
    compare_runs(runs, tmp_path / "a.md")
    compare_runs(runs[::-1], tmp_path / "b.md")
    table = (tmp_path / "a.md").read_text()
    assert table == (tmp_path / "b.md").read_text()
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert table.index("| local / personalized |") < table.index("| iopfl / personalized |")  # registry order
    # iopfl site A over seeds: mean 85.00, sample std 7.07; mean column: (70 + 80) / 2 = 75.00 ± 7.07
    assert "| iopfl / personalized | 85.00 ± 7.07 | 65.00 ± 7.07 | 75.00 ± 7.07 |" in table
