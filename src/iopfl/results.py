"""What a run reports, typed: ``results.json`` and ``metrics.jsonl`` (docs/ARCHITECTURE.md, "run
directory"), and the only functions that write and read them.

Every model allows keys it does not declare and writes back only the keys it was given, so a file read
and written again keeps every key, in its order; fields that older runs lack are optional. Floats are
written as Python's ``json`` writes them (``NaN`` for a site without cases), as before this schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text

#: The models a strategy reports (``Strategy.models``): θ, the global model, and each site's own.
GLOBAL = "global"
PERSONALIZED = "personalized"
#: metrics.jsonl's ``model`` of a site's training-loss line.
LOCAL = "local"

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


class Record(BaseModel):
    """An open record: undeclared keys are kept; :meth:`dump` writes exactly the keys that were set."""

    model_config = ConfigDict(extra="allow")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class RegionScores(Record):
    dice: float
    hd95: float
    assd: float


class Scores(Record):
    """A site's (or the mean over sites') figures: Dice a fraction, HD95/ASSD in the run's ``units``."""

    dice: float
    hd95: float
    assd: float
    ref_dice: float | None = None  # the published code's Dice (mean over slices)
    n: int | None = None  # cases scored (a site's entry only)
    regions: dict[str, RegionScores] | None = None  # per evaluated region (fundus: disc, cup)


class ModelEntry(Record):
    """One model's test figures: per site and their mean."""

    sites: dict[str, Scores]
    mean: Scores
    subsets: dict[str, Scores] | None = None  # outside benchmarks: figures on named case subsets


class LastRound(Record):
    round: int
    models: dict[str, ModelEntry]


class OutsideEntry(Record):
    """What ``iopfl demo`` adds to its hold-out run: every adaptation method on the unseen site."""

    target: str
    models: dict[str, ModelEntry]


class RunResults(Record):
    """results.json of a training run; ``models`` holds the val-selected models, by model name."""

    method: str
    federated: bool | None = None
    engine: str | None = None
    dataset: str
    seed: int | None = None
    rounds: int | None = None
    sites: list[str] = []
    holdout: str | None = None
    models: dict[str, ModelEntry]
    last_round: LastRound | None = None
    selection: dict[str, int | dict[str, int]] = {}  # GLOBAL: a round; PERSONALIZED: a round per site
    published: list[str] = []  # sites whose personalised model is in experts/
    experts: dict[str, str] = {}  # site → its file, relative to the run directory
    units: dict[str, str] = {}  # metric → unit ("fraction", "mm", "pixels")
    grid: str | None = None
    outside: OutsideEntry | None = None


class SafeguardSummary(Record):
    batches: int
    fallbacks: int
    reasons: dict[str, int]
    to_bn: int


class OutsideResults(Record):
    """results.json of ``iopfl adapt``; ``models`` is keyed by adaptation method."""

    method: Literal["outside"]
    dataset: str
    seed: int | None = None
    target: str
    experts: list[str] = []  # GLOBAL, then each published site
    models: dict[str, ModelEntry]
    grid: str | None = None
    safeguard: dict[str, SafeguardSummary] = {}
    compute: dict[str, Any] = {}


Results = RunResults | OutsideResults


class TrainLine(Record):
    """A site's mean local training loss in a round."""

    round: int
    model: Literal["local"]
    split: Literal["train"]
    site: str
    loss: float
    lr: float | None = None  # the round's learning rate (lines written before it was logged have none)


class EvalLine(Record):
    """One model's figures on one site's split in an evaluated round."""

    round: int
    model: str  # GLOBAL | PERSONALIZED
    split: Literal["val", "test"]
    site: str
    dice: float
    hd95: float
    assd: float
    ref_dice: float | None = None
    n: int | None = None


MetricsLine = Annotated[TrainLine | EvalLine, Field(discriminator="split")]
_LINE = TypeAdapter(MetricsLine)


def _problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def write_results(path: Path, results: Results) -> None:
    """Replace ``path`` atomically (a crash leaves the old file or the new one)."""
    atomic_write_text(Path(path), json.dumps(results.dump(), indent=2) + "\n")


def read_results(path: Path) -> Results:
    """A results.json of a training run or of ``iopfl adapt`` (``method: outside``)."""
    path = Path(path)
    try:
        tree = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (is {path.parent} a finished run?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    kind = OutsideResults if isinstance(tree, dict) and tree.get("method") == "outside" else RunResults
    try:
        return kind.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{path}: malformed results ({_problem(exc)})") from None


def read_run_results(path: Path) -> RunResults:
    """A training run's results.json; the results of ``iopfl adapt`` are refused."""
    results = read_results(path)
    if isinstance(results, OutsideResults):
        raise UserError(f"{path}: results of `iopfl adapt`, not of a training run")
    return results


def append_metrics(path: Path, lines: Sequence[TrainLine | EvalLine]) -> None:
    """The one place metrics lines are appended: flushed to disk before returning."""
    with Path(path).open("a") as fh:
        fh.writelines(json.dumps(line.dump()) + "\n" for line in lines)
        fh.flush()
        os.fsync(fh.fileno())


def write_metrics(path: Path, lines: Sequence[TrainLine | EvalLine]) -> None:
    """Replace the whole file atomically (resume trims it back to the checkpointed round)."""
    atomic_write_text(Path(path), "".join(json.dumps(line.dump()) + "\n" for line in lines))


def read_metrics(path: Path) -> list[TrainLine | EvalLine]:
    """Every line of ``path`` (none when it does not exist). A line that is not JSON is skipped: a
    crash mid-append tears the last line, and that round is re-run on resume."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            tree = json.loads(raw)
        except json.JSONDecodeError:
            continue
        try:
            lines.append(_LINE.validate_python(tree))
        except ValidationError as exc:
            raise UserError(f"{path}: line {number} is not a metrics line ({_problem(exc)})") from None
    return lines
