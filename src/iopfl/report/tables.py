"""Markdown tables of results.json entries: Dice in percent, distances in the run's unit (mm for
volumes, original pixels for 2D images: results.json `units`)."""

from __future__ import annotations

import math

from iopfl.results import ModelEntry, RegionScores, SafeguardSummary, Scores

COLUMNS = (("dice", "Dice %", 100.0), ("hd95", "HD95", 1.0), ("assd", "ASSD", 1.0))


def fmt(value: float, scale: float = 1.0) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{scale * value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def models_table(models: dict[str, ModelEntry]) -> str:
    """Rows = model, columns = each site's and the mean's Dice / HD95 / ASSD."""
    if not models:
        return "_no models_\n"
    sites = list(next(iter(models.values())).sites)
    header = ["model", "metric", *sites, "mean"]
    rows = []
    for name, entry in models.items():
        for key, label, scale in COLUMNS:
            cells = [fmt(getattr(entry.sites[s], key), scale) for s in sites]
            rows.append([name, label, *cells, fmt(getattr(entry.mean, key), scale)])
    return markdown_table(header, rows)


def regions_table(models: dict[str, ModelEntry]) -> str:
    """Dice % per evaluated region (rows = model × region, columns = sites and the mean); empty when the
    dataset has a single region, whose figures are those of :func:`models_table`."""
    first = next(iter(models.values()), None)
    regions = list(first.mean.regions or {}) if first else []
    if first is None or len(regions) < 2:
        return ""
    sites = list(first.sites)
    rows = [
        [
            name,
            region,
            *(fmt(_regions(entry.sites[s])[region].dice, 100.0) for s in sites),
            fmt(_regions(entry.mean)[region].dice, 100.0),
        ]
        for name, entry in models.items()
        for region in regions
    ]
    return markdown_table(["model", "region (Dice %)", *sites, "mean"], rows)


def _regions(scores: Scores) -> dict[str, RegionScores]:
    return scores.regions or {}


def safeguard_table(safeguard: dict[str, SafeguardSummary]) -> str:
    """Per adaptive method: batches, how many fell back (by reason) and how many got BN-adapt's prediction."""
    rows = [
        [
            name,
            str(s.batches),
            str(s.fallbacks),
            ", ".join(f"{k} {v}" for k, v in s.reasons.items()) or "—",
            str(s.to_bn),
        ]
        for name, s in safeguard.items()
    ]
    return "Safeguard (label-free collapse check after every batch):\n\n" + markdown_table(
        ["method", "batches", "fell back", "why", "given BN-adapt's prediction"], rows
    )
