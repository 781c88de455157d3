"""TensorBoard mirrors of what iopfl writes (docs/TRACKING.md, the ``track`` config section).

A run's ``metrics.jsonl`` lines, its config, its selected rounds and its end-of-run overlays go to
``RUN/tensorboard/`` (step = round); an adaptation's per-batch trace to ``OUT/tensorboard/<method>/``
(step = batch). iopfl never reads these files back, so a write that fails is one warning and turns the
mirror off for the rest of the run: tracking never stops a run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

Scalar = tuple[str, float, int]  # (tag, value, step)
EVAL_KEYS = ("dice", "hd95", "assd", "ref_dice")


def metric_scalars(lines: Iterable[dict[str, Any]]) -> list[Scalar]:
    """The scalars of metrics.jsonl lines (docs/ARCHITECTURE.md, "run directory"): ``train/loss/<site>``
    and ``train/lr/<site>`` per trained site; ``<split>/<metric>/<model>/<site>`` per evaluation line
    and ``<split>/<metric>/<model>/mean``, the mean over the sites of the lines given together."""
    out: list[Scalar] = []
    by_group: dict[tuple[int, str, str, str], list[Any]] = defaultdict(list)
    for line in lines:
        round_, model, split, site = line["round"], line["model"], line["split"], line["site"]
        for key in ("loss", "lr") if model == "local" else EVAL_KEYS:
            value = line.get(key)
            if model != "local":
                by_group[(round_, split, key, model)].append(value)
            if _is_number(value):
                tag = f"train/{key}/{site}" if model == "local" else f"{split}/{key}/{model}/{site}"
                out.append((tag, float(value), round_))
    for (round_, split, key, model), values in by_group.items():
        if all(_is_number(v) for v in values):  # a mean over some of the sites would read as over all
            out.append((f"{split}/{key}/{model}/mean", sum(values) / len(values), round_))
    return out


def trace_scalars(trace: Iterable[dict[str, Any]]) -> tuple[list[Scalar], list[tuple[str, str, int]]]:
    """Scalars and texts of an adaptation trace (one record per batch of the last pass): ``loss/<term>``,
    ``gates/<sum|min|max>/<routed layer index>``, ``safeguard/<signal>``, and the safeguard's
    ``fallback`` reason as text."""
    scalars: list[Scalar] = []
    texts: list[tuple[str, str, int]] = []
    for record in trace:
        step = int(record["batch"])
        for key, value in record.items():
            if key in ("pass", "batch"):
                continue
            if isinstance(value, list):
                name = key.removeprefix("gate_")
                scalars.extend((f"gates/{name}/{i}", float(v), step) for i, v in enumerate(value) if _is_number(v))
            elif isinstance(value, str):
                texts.append((f"safeguard/{key}", value, step))
            elif _is_number(value):
                tag = f"loss/{key.removeprefix('loss_')}" if key.startswith("loss_") else f"safeguard/{key}"
                scalars.append((tag, float(value), step))
    return scalars, texts


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config tree as TensorBoard hparams: dotted keys, lists as JSON text, unset (None) keys left out."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = json.dumps(value)
    return out


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class SyncEventWriter:
    """TensorBoard's event file, written synchronously: every event is on disk when a write returns.
    tensorboardX's SummaryWriter queues events for a background thread, so a run killed right after a
    checkpoint could lose the scalars of the round it had just checkpointed — which its resume never
    writes again. ``purge_step``: TensorBoard hides what earlier files hold from that step on."""

    def __init__(self, logdir: Path, suffix: str, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        self.file = EventsWriter(str(logdir / "events"), suffix)  # writes the file-version header
        if purge_step is not None:
            self.file.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.file.flush()

    def add_summary(self, summary: Any, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.file.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self.add_summary(scalar(tag, value), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        from tensorboardX.summary import text as text_summary

        self.add_summary(text_summary(tag, text), step)

    def add_image(self, tag: str, pixels: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        from tensorboardX.summary import image

        self.add_summary(image(tag, pixels, dataformats=dataformats), step)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard:
    """One TensorBoard run folder written from this process. ``first_step``: the first step this writer
    writes; TensorBoard hides what an earlier, interrupted writer wrote from that step on (a resumed
    run re-runs those rounds), so a resumed run shows every step once. ``None``: hide nothing — a run
    resumed after its last round only finishes (its end-of-run images go at the last round's step, and
    hiding from there on would hide that round's scalars as well)."""

    def __init__(self, logdir: Path, warn: Callable[[str], None], first_step: int | None = 0):
        self.logdir, self.warn = Path(logdir), warn
        self.writer: Any = None
        try:
            # a name of its own: two writers opened within one second would otherwise share (overwrite) a file
            suffix = ".finish" if first_step is None else f".from-step-{first_step:06d}"
            self.writer = SyncEventWriter(self.logdir, suffix, first_step)
        except Exception as exc:  # noqa: BLE001 — tracking must never end a run
            self._give_up("opening", exc)

    def _give_up(self, what: str, exc: Exception) -> None:
        self.warn(
            f"TensorBoard: {what} {self.logdir} failed ({type(exc).__name__}: {exc}); "
            "no more TensorBoard logging in this run"
        )
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 — already reported
                pass

    def _safe(self, what: str, write: Callable[[], None]) -> None:
        """Run one write unless the mirror is off; a failure turns it off (what was written stays readable)."""
        if self.writer is None:
            return
        try:
            write()
        except Exception as exc:  # noqa: BLE001 — tracking must never end a run
            self._give_up(what, exc)

    def metrics(self, lines: list[dict[str, Any]]) -> None:
        """metrics.jsonl lines, as :func:`metric_scalars` names them."""
        self._safe("writing metrics to", lambda: self._write(metric_scalars(lines)))

    def trace(self, records: list[dict[str, Any]]) -> None:
        """An adaptation trace, as :func:`trace_scalars` names it."""
        self._safe("writing the trace to", lambda: self._write(*trace_scalars(records)))

    def scalars(self, values: list[Scalar]) -> None:
        self._safe("writing scalars to", lambda: self._write(values))

    def _write(self, scalars: Iterable[Scalar], texts: Iterable[tuple[str, str, int]] = ()) -> None:
        """Write and flush, so the events on disk keep up with metrics.jsonl (a crash loses nothing)."""
        for tag, value, step in scalars:
            self.writer.add_scalar(tag, value, step)
        for tag, text, step in texts:
            self.writer.add_text(tag, text, step)
        self.writer.flush()

    def config(self, tree: dict[str, Any], yaml_text: str, metric_tags: list[str]) -> None:
        """The resolved config as text (step 0) and as hparams, with the metrics the hparams view shows."""

        def write() -> None:
            from tensorboardX.summary import hparams

            self.writer.add_text("config", "\n".join(f"    {row}" for row in yaml_text.splitlines()), 0)
            experiment, session_start, _ = hparams(flat_hparams(tree), dict.fromkeys(metric_tags))
            self.writer.add_summary(experiment, 0)
            self.writer.add_summary(session_start, 0)
            self.writer.flush()

        self._safe("writing the config to", write)

    def images(self, paths: Iterable[Path], step: int, prefix: str) -> None:
        """PNG files as images ``<prefix>/<file stem>``."""

        def write() -> None:
            from PIL import Image

            for path in paths:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
                self.writer.add_image(f"{prefix}/{path.stem}", pixels, step, dataformats="HWC")
            self.writer.flush()

        self._safe("writing images to", write)

    def close(self) -> None:
        self._safe("closing", lambda: self.writer.close())
        self.writer = None


def remove_logs(logdir: Path) -> None:
    """Drop a TensorBoard folder whose contents are being replaced (a new run, a re-written trace)."""
    shutil.rmtree(logdir, ignore_errors=True)
