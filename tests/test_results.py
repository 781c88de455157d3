"""The results schema (iopfl/results.py): run and `iopfl adapt` results of the current format (checked
in under tests/data/) still read and are written back byte for byte; unknown keys survive; a malformed
file is a UserError naming it; the model names are the schema's constants."""

import ast
import json
import math
import shutil
from pathlib import Path

import pytest

from iopfl.errors import UserError
from iopfl.fl import STRATEGIES
from iopfl.results import (
    GLOBAL,
    LOCAL,
    PERSONALIZED,
    EvalLine,
    ModelEntry,
    OutsideResults,
    SafeguardSummary,
    TrainLine,
    append_metrics,
    read_metrics,
    read_results,
    read_run_results,
    write_metrics,
    write_results,
)

RECORD = Path(__file__).parent / "data" / "run-iopfl-synthetic"  # an iopfl run without SiteC, seed 0
OUTSIDE = Path(__file__).parent / "data" / "outside-tent"
SRC = Path(__file__).resolve().parents[1] / "src" / "iopfl"


def test_checked_in_results_read_typed_and_write_back_byte_for_byte(tmp_path):
    results = read_run_results(RECORD / "results.json")
    assert (results.method, results.dataset, results.holdout) == ("iopfl", "synthetic", "SiteC")
    assert set(results.models) == {GLOBAL, PERSONALIZED}
    assert results.sites == ["SiteA", "SiteB", "SiteD", "SiteE", "SiteF"]
    personal = results.models[PERSONALIZED]
    assert set(personal.sites) == set(results.sites) and personal.sites["SiteA"].n == 2
    assert personal.mean.dice == pytest.approx(sum(s.dice for s in personal.sites.values()) / 5)
    assert personal.sites["SiteA"].regions["prostate"].dice == personal.sites["SiteA"].dice
    assert results.selection[GLOBAL] == 12 and results.selection[PERSONALIZED]["SiteF"] == 12
    assert results.last_round.round == 16 and results.published == results.sites
    assert results.units["hd95"] == "mm"

    write_results(tmp_path / "results.json", results)
    assert (tmp_path / "results.json").read_bytes() == (RECORD / "results.json").read_bytes()


def test_checked_in_metrics_read_typed_and_write_back_byte_for_byte(tmp_path):
    lines = read_metrics(RECORD / "metrics.jsonl")
    train = [x for x in lines if isinstance(x, TrainLine)]
    evals = [x for x in lines if isinstance(x, EvalLine)]
    assert len(train) + len(evals) == len((RECORD / "metrics.jsonl").read_text().splitlines())
    assert {x.model for x in train} == {LOCAL} and {x.model for x in evals} == {GLOBAL, PERSONALIZED}
    assert {x.split for x in evals} == {"val", "test"} and all(math.isfinite(x.loss) for x in train)
    # the val-selected personalised round of SiteF (12) holds the test Dice results.json reports for it
    results = read_run_results(RECORD / "results.json")
    at = [x for x in evals if (x.round, x.model, x.split, x.site) == (12, PERSONALIZED, "test", "SiteF")]
    assert [x.dice for x in at] == [results.models[PERSONALIZED].sites["SiteF"].dice]

    write_metrics(tmp_path / "metrics.jsonl", lines)
    assert (tmp_path / "metrics.jsonl").read_bytes() == (RECORD / "metrics.jsonl").read_bytes()


def test_checked_in_outside_results_read_typed_and_write_back_byte_for_byte(tmp_path):
    """results.json of `iopfl adapt --method tent` on a held-out synthetic site."""
    results = read_results(OUTSIDE / "results.json")
    assert isinstance(results, OutsideResults) and results.target == "SiteC"
    assert results.experts == [GLOBAL, "SiteA", "SiteB"] and set(results.models) == {"tent"}
    assert results.models["tent"].sites["SiteC"].n == 3 and results.safeguard["tent"].batches == 3
    write_results(tmp_path / "results.json", results)
    assert (tmp_path / "results.json").read_bytes() == (OUTSIDE / "results.json").read_bytes()


def test_unknown_keys_and_nan_survive_a_read_and_write(tmp_path):
    tree = json.loads((RECORD / "results.json").read_text())
    tree["models"][GLOBAL]["sites"]["SiteA"]["dice_std"] = 0.25
    tree["models"][GLOBAL]["sites"]["SiteB"]["dice"] = math.nan  # a site without test cases
    tree["future"] = {"anything": [1, 2]}
    path = tmp_path / "in.json"
    path.write_text(json.dumps(tree, indent=2) + "\n")
    results = read_run_results(path)
    assert math.isnan(results.models[GLOBAL].sites["SiteB"].dice)
    write_results(tmp_path / "out.json", results)
    assert (tmp_path / "out.json").read_text() == path.read_text()
    assert "NaN" in (tmp_path / "out.json").read_text()  # written as Python's json writes it


def test_an_older_run_without_the_later_keys_still_reads(tmp_path):
    """Only method, dataset and models are required (what `iopfl report` always needed)."""
    path = tmp_path / "results.json"
    scores = {"dice": 0.5, "hd95": 1.0, "assd": 0.5}
    path.write_text(
        json.dumps(
            {"method": "fedavg", "dataset": "prostate", "models": {GLOBAL: {"sites": {"A": scores}, "mean": scores}}}
        )
    )
    results = read_run_results(path)
    assert results.last_round is None and results.published == [] and results.units == {}
    write_results(tmp_path / "again.json", results)
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())


def test_outside_results_round_trip_and_are_told_apart_from_a_run(tmp_path):
    entry = {
        "sites": {"SiteC": {"dice": 0.7, "hd95": 2.0, "assd": 1.0, "ref_dice": 0.8, "n": 3, "regions": {}}},
        "mean": {"dice": 0.7, "hd95": 2.0, "assd": 1.0, "ref_dice": 0.8, "n": 3, "regions": {}},
    }
    results = OutsideResults(
        method="outside",
        dataset="synthetic",
        seed=0,
        target="SiteC",
        experts=[GLOBAL, "SiteA"],
        models={"bn": ModelEntry.model_validate(entry)},
        grid="original",
        safeguard={"tent": SafeguardSummary(batches=4, fallbacks=1, reasons={"entropy": 1}, to_bn=0)},
        compute={"device": "cpu"},
    )
    path = tmp_path / "results.json"
    write_results(path, results)
    tree = json.loads(path.read_text())
    assert list(tree) == ["method", "dataset", "seed", "target", "experts", "models", "grid", "safeguard", "compute"]
    again = read_results(path)
    assert isinstance(again, OutsideResults) and again == results
    with pytest.raises(UserError, match=r"results\.json.*iopfl adapt"):
        read_run_results(path)


def _damaged(tmp_path: Path, damage) -> Path:
    tree = json.loads((RECORD / "results.json").read_text())
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(damage(tree) if callable(damage) else damage)
    return path


@pytest.mark.parametrize(
    "damage, needle",
    [
        ('{"method": "iopfl", "models": {', "unreadable"),  # torn
        ("[1, 2]", "malformed"),  # not an object
        (lambda t: json.dumps({k: v for k, v in t.items() if k != "models"}), "models"),
        (lambda t: json.dumps({**t, "seed": "zero"}), "seed"),
        (lambda t: json.dumps({**t, "published": "SiteA"}), "published"),
        (
            lambda t: json.dumps({**t, "models": {GLOBAL: {"sites": {}, "mean": {"dice": "high"}}}}),
            "models.global.mean.dice",
        ),
    ],
)
def test_a_malformed_results_file_is_a_user_error_naming_it(tmp_path, damage, needle):
    path = _damaged(tmp_path, damage)
    with pytest.raises(UserError) as err:
        read_results(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_a_missing_results_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"results\.json: not found"):
        read_results(tmp_path / "results.json")


def test_metrics_lines_append_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    append_metrics(path, [TrainLine(round=1, model=LOCAL, split="train", site="A", loss=0.5)])
    append_metrics(
        path, [EvalLine(round=1, model=GLOBAL, split="val", site="A", dice=0.8, hd95=1.0, assd=0.5, ref_dice=0.9, n=2)]
    )
    assert path.read_text().splitlines() == [
        '{"round": 1, "model": "local", "split": "train", "site": "A", "loss": 0.5}',
        '{"round": 1, "model": "global", "split": "val", "site": "A", "dice": 0.8, "hd95": 1.0, "assd": 0.5, '
        '"ref_dice": 0.9, "n": 2}',
    ]
    with path.open("a") as fh:
        fh.write('{"round": 2, "model": "loc')  # a crash mid-append
    lines = read_metrics(path)
    assert [type(x) for x in lines] == [TrainLine, EvalLine] and lines[1].dice == 0.8


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"round": 1, "model": "global", "split": "sideways", "site": "A"}', "split"),
        ('{"round": 1, "model": "local", "split": "train", "site": "A"}', "loss"),
        (
            '{"round": "first", "model": "global", "split": "val", "site": "A", "dice": 1, "hd95": 0, "assd": 0}',
            "round",
        ),
    ],
)
def test_a_line_that_is_not_a_metrics_line_is_a_user_error_naming_file_and_line(tmp_path, line, needle):
    path = tmp_path / "metrics.jsonl"
    shutil.copy(RECORD / "metrics.jsonl", path)
    with path.open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(UserError) as err:
        read_metrics(path)
    assert f"{path}: line 161" in str(err.value) and needle in str(err.value)


def test_every_strategy_reports_only_the_schema_model_names():
    for name, strategy in STRATEGIES.items():
        assert strategy.models and set(strategy.models) <= {GLOBAL, PERSONALIZED}, name


# "global" also names things that are not a reported model: the outside method that adapts nothing
# and the router's gate initialisation toward the global expert (config values)
OTHER_GLOBALS = {"adapt/global_.py", "adapt/config.py", "models/routing.py"}


def test_model_names_are_written_only_as_the_schema_constants():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "results.py":
            continue
        names = {PERSONALIZED} if rel in OTHER_GLOBALS else {GLOBAL, PERSONALIZED}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "use iopfl.results.GLOBAL / PERSONALIZED:\n" + "\n".join(found)
