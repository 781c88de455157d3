"""TensorBoard logging (docs/TRACKING.md): the event files, read back with TensorBoard's own reader,
hold exactly what metrics.jsonl and an adaptation's trace.jsonl hold — once per step, after a resume too."""

import json

import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

from _events import assert_events_match_metrics, read_events, scalar_series
from _tiny import tiny_config
from iopfl.commands.adapt import run_adapt
from iopfl.config import build_config
from iopfl.engine.federation import Federation
from iopfl.engine.local import in_process_run
from iopfl.errors import UserError
from iopfl.track import TensorBoard


@pytest.mark.parametrize(
    "override, message",
    [
        ("track.tensorboard=maybe", "'track.tensorboard': Input should be"),
        ("track.wandb=true", "'track.wandb': unknown key"),
    ],
)
def test_a_bad_track_key_is_named(override, message):
    with pytest.raises(UserError, match=message):
        build_config({}, [override])


def test_tracking_is_on_by_default_and_outside_the_config_digest():
    """Turning tracking off or on changes no result, so an interrupted run resumes either way."""
    on = build_config({})
    assert on.track.tensorboard
    assert on.digest() == build_config({}, ["track.tensorboard=false"]).digest()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Two sites trained (SiteC held out) for 2 cosine-scheduled rounds, interrupted while evaluating
    round 2 (its training lines already written), then resumed: round 2 runs and is logged twice."""
    root = tmp_path_factory.mktemp("tb")
    cfg = tiny_config(root / "cache", ["fl.rounds=2", "data.holdout=SiteC", "train.lr_schedule=cosine"])
    original = Federation._evaluate_round

    def crash(self, round_):
        if round_ == 2:
            raise KeyboardInterrupt
        original(self, round_)

    Federation._evaluate_round = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            in_process_run(cfg, root / "run").run()
    finally:
        Federation._evaluate_round = original
    results = in_process_run(cfg, root / "run").run(resume=True)
    return root / "run", results


@pytest.mark.slow
def test_scalars_equal_metrics_jsonl_once_per_round_after_a_resume(resumed_run):
    run, _ = resumed_run
    seen = assert_events_match_metrics(run)
    # the cosine schedule: round 1 at train.lr, the last round at train.lr_min
    assert [v for _, v in seen["train/lr/SiteA"]] == pytest.approx([0.01, 0.0])
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resume wrote a file of its own


@pytest.mark.slow
def test_selection_config_and_overlays_are_logged(resumed_run):
    run, results = resumed_run
    events = read_events(run / "tensorboard")
    seen = scalar_series(events)
    assert seen["selection/global"][-1] == (2, results["selection"]["global"])
    for site, round_ in results["selection"]["personalized"].items():
        assert seen[f"selection/personalized/{site}"][-1] == (2, round_)
    config = events.Tensors("config/text_summary")
    assert len(config) == 1 and b"method: iopfl" in config[0].tensor_proto.string_val[0]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["fl.method"].string_value == "iopfl"
    assert start.hparams["train.lr"].number_value == pytest.approx(0.01)
    overlays = sorted(p.stem for p in (run / "plots" / "overlays").glob("*.png"))
    assert overlays and events.Tags()["images"] == [f"overlays/{name}" for name in overlays]


@pytest.mark.slow
def test_adapt_mirrors_its_trace_and_tracking_can_be_turned_off(resumed_run, tmp_path):
    run, _ = resumed_run
    run_adapt(run, "SiteC", "iopfl", tmp_path / "on", [])
    trace = [json.loads(raw) for raw in (tmp_path / "on" / "iopfl" / "trace.jsonl").read_text().splitlines()]
    seen = scalar_series(read_events(tmp_path / "on" / "tensorboard" / "iopfl"))
    losses = [k.removeprefix("loss_") for k in trace[0] if k.startswith("loss_")]
    assert losses and len(trace) > 1
    for term in losses:
        assert seen[f"loss/{term}"] == [(r["batch"], pytest.approx(r[f"loss_{term}"], rel=1e-6)) for r in trace]
    for layer, _ in enumerate(trace[0]["gate_sum"]):
        expected = [(r["batch"], pytest.approx(r["gate_sum"][layer], rel=1e-6)) for r in trace]
        assert seen[f"gates/sum/{layer}"] == expected
    run_adapt(run, "SiteC", "iopfl", tmp_path / "off", ["track.tensorboard=false"])
    assert (tmp_path / "off" / "iopfl" / "trace.jsonl").exists()
    assert not (tmp_path / "off" / "tensorboard").exists()


@pytest.mark.slow
def test_a_run_without_tracking_writes_no_events(tmp_path):
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=1", "track.tensorboard=false"], sites=2)
    in_process_run(cfg, tmp_path / "run").run()
    assert (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_failing_write_is_one_warning_and_stops_tracking(tmp_path, monkeypatch):
    warnings: list[str] = []
    board = TensorBoard(tmp_path / "tb", warnings.append)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(board.writer, "add_scalar", disk_full)
    board.scalars([("selection/global", 1, 1)])
    board.metrics([{"round": 2, "model": "local", "split": "train", "site": "A", "loss": 0.4, "lr": 0.1}])
    board.close()
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert board.writer is None


def test_a_metrics_line_the_mirror_cannot_read_is_a_warning(tmp_path):
    warnings: list[str] = []
    board = TensorBoard(tmp_path / "tb", warnings.append)
    board.metrics([{"round": 1, "model": "global", "split": "val"}])  # no site
    board.close()
    assert len(warnings) == 1 and "KeyError" in warnings[0]


@pytest.mark.slow
def test_a_failing_tracker_does_not_stop_a_run(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("iopfl.track.SyncEventWriter.add_scalar", broken)
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=1"], sites=2)
    results = in_process_run(cfg, tmp_path / "run").run()
    assert results["last_round"]["round"] == 1
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("WARNING TensorBoard: writing metrics") == 1 and "Input/output error" in log


@pytest.mark.slow
def test_a_run_resumed_after_its_last_round_hides_nothing(tmp_path):
    """A crash after the last checkpoint (while writing results and overlays): the resumed run only
    finishes, and its overlays at the last round's step must not make TensorBoard hide that round."""
    cfg = tiny_config(tmp_path / "cache", ["fl.rounds=2", "data.holdout=SiteC"])
    in_process_run(cfg, tmp_path / "run").run()
    in_process_run(cfg, tmp_path / "run").run(resume=True)  # finishes again, as after a crash at the end
    seen = assert_events_match_metrics(tmp_path / "run")
    assert [s for s, _ in seen["test/dice/global/mean"]] == [1, 2]
    assert len(list((tmp_path / "run" / "tensorboard").glob("*.finish"))) == 1
