"""Reading TensorBoard event files back with TensorBoard's own reader, and what they should hold for a
run's metrics.jsonl (worked out here from the lines, not with iopfl's mapping)."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_events(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """By tag, (step, value) as TensorBoard shows them (what an interrupted writer left, purged)."""
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_from_metrics(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    per_site: dict[tuple, list[float]] = defaultdict(list)
    for line in lines:
        r = line["round"]
        if line["model"] == "local":
            series[f"train/loss/{line['site']}"].append((r, line["loss"]))
            series[f"train/lr/{line['site']}"].append((r, line["lr"]))
            continue
        for key in ("dice", "hd95", "assd", "ref_dice"):
            series[f"{line['split']}/{key}/{line['model']}/{line['site']}"].append((r, line[key]))
            per_site[line["split"], key, line["model"], r].append(line[key])
    for (split, key, model, r), values in per_site.items():
        series[f"{split}/{key}/{model}/mean"].append((r, sum(values) / len(values)))
    return series


def assert_events_match_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """RUN/tensorboard holds every value of RUN/metrics.jsonl, each round once (float32 in the events)."""
    lines = [json.loads(raw) for raw in (run / "metrics.jsonl").read_text().splitlines()]
    seen = scalar_series(read_events(run / "tensorboard"))
    expected = expected_from_metrics(lines)
    assert expected and set(expected) <= set(seen)
    for tag, series in expected.items():
        assert [s for s, _ in seen[tag]] == [s for s, _ in series], tag
        assert [v for _, v in seen[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag
    return seen
