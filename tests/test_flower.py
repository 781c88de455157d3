"""The Flower engine: loopback deployments give the in-process numbers (also with TLS and SuperNode
authentication, and in Flower's simulation runtime), a failing site is left out and logged, a
restarted server resumes, a site's replies carry only shared weights, its sample count and metrics,
and only sites that opted in publish their personalised model (which `iopfl adapt` then routes among).

Every Flower process is bound to 127.0.0.1, runs with telemetry and update checks off and a FLWR_HOME
under pytest's tmp dir, and is stopped by PID in the fixtures' teardown (also when a test fails).
The four deployments (insecure, TLS with SuperNode authentication, one with a failing site, and the
simulation runtime) run concurrently in one module-scoped fixture.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from _deploy import Deployment, RunOutcome
from _events import assert_events_match_metrics
from _faulty_client import fail_if_asked, faulty_app
from _tiny import tiny_config, tiny_tree

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, MessageType, RecordDict

from iopfl import CONFIG_DIR
from iopfl.data import load_dataset
from iopfl.engine.checkpoint import load_checkpoint
from iopfl.engine.federation import Federation
from iopfl.engine.flower import client as flower_client
from iopfl.engine.flower import wire
from iopfl.engine.flower.server import Settings, flower_run
from iopfl.engine.flower.state import EVALUATE, TRAIN, SiteStateStore
from iopfl.engine.local import in_process_run
from iopfl.engine.rounds import initial_weights
from iopfl.engine.site import make_client
from iopfl.errors import UserError
from iopfl.fl import build_strategy
from iopfl.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
SITES = ["SiteA", "SiteB", "SiteC"]
HOLDOUT = "SiteD"  # the unseen site that outside personalization adapts to
PUBLISHERS = {"SiteA", "SiteB"}  # sites of the plain deployment that opt in to publish their model
# two rounds, one evaluation (every phase costs seconds of Flower polling and process start-up);
# one torch thread per process: 3 SuperNodes share 2 cores, and equal thread counts keep the float
# sums of both engines identical
OVERRIDES = ["fl.rounds=2", "eval.eval_every=2", "runtime.threads=1", f"data.holdout={HOLDOUT}"]
HAS_TLS_TOOLS = bool(shutil.which("openssl") and shutil.which("ssh-keygen"))
HAS_RAY = importlib.util.find_spec("ray") is not None  # Flower's simulation runtime


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The config file every deployment runs, and the in-process results for it."""
    root = tmp_path_factory.mktemp("flower")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(root / "cache", sites=4)))
    threads = torch.get_num_threads()
    try:  # the in-process run also fills the data cache, so SuperNodes never generate data concurrently
        results = in_process_run(tiny_config(root / "cache", OVERRIDES, sites=4), root / "inprocess").run()
    finally:
        torch.set_num_threads(threads)
    return root, config, results


@pytest.fixture(scope="module")
def certs(reference):
    """scripts/make_certs.sh output, or None without openssl/ssh-keygen (the TLS tests then skip)."""
    if not HAS_TLS_TOOLS:
        return None
    out = reference[0] / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out)], check=True, capture_output=True)
    return out


@dataclass
class Job:
    """One deployment's run: its Flower outcome, the processes' logs, and job-specific checks."""

    outcome: RunOutcome | None = None
    logs: str = ""
    extra: dict = field(default_factory=dict)


LIVE: list[Deployment] = []  # every deployment the jobs start: stopped again at teardown, whatever happened


def deployment(home: Path, **kw) -> Deployment:
    d = Deployment(home, **kw)
    LIVE.append(d)
    return d


def plain_job(root: Path, config: Path) -> Job:
    """SiteA and SiteB opt in to publish their personalised models; SiteC does not."""
    with deployment(root / "home-plain") as d:
        d.start_superlink()
        for site in SITES:
            d.add_supernode(site, **({"publish-personal": "true"} if site in PUBLISHERS else {}))
        d.wait_for_nodes(len(SITES))
        job = Job(deploy_run(d, config, root / "run-plain"))
        job.logs = d.log_text()
    return job


def failing_job(root: Path, config: Path) -> Job:
    """The tests' ClientApp (``_faulty_client``): SiteB's SuperNode says ``fail-at-round=2``."""
    app = faulty_app(root / "faulty-app")
    with deployment(root / "home-fail") as d:
        d.start_superlink()
        for site in SITES:
            d.add_supernode(site, **({"fail-at-round": 2} if site == "SiteB" else {}))
        d.wait_for_nodes(len(SITES))
        job = Job(d.run(config, root / "run-fail", overrides=OVERRIDES, nodes=len(SITES), timeout=300, app=app))
        job.logs = d.log_text()
    return job


def secure_job(root: Path, config: Path, certs: Path) -> Job:
    """TLS and SuperNode authentication (each SuperNode's key registered before it starts); then a
    SuperNode whose key was never registered tries to join."""
    keys = {site: certs / f"supernode-{i}" for i, site in enumerate(SITES, 1)}
    with deployment(root / "home-tls", certs=certs, auth=True) as d:
        d.start(SITES, auth_keys=keys)
        job = Job(deploy_run(d, config, root / "run-tls"))
        stranger = root / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(stranger)], check=True)
        d.add_supernode("Intruder", auth_key=stranger, max_retries=1)
        job.extra["intruder_exit"] = d.procs["supernode-Intruder"].wait(timeout=60)
        job.extra["intruder_log"] = d.log_text("supernode-Intruder")
        job.logs = d.log_text("superlink")
    return job


def simulation_job(root: Path, config: Path) -> Job:
    with deployment(root / "home-sim", simulation=True) as d:
        d.start_superlink()
        job = Job(d.run(config, root / "run-sim", overrides=OVERRIDES, supernodes=len(SITES), timeout=300))
    return job


@pytest.fixture(scope="module")
def deployments(reference, certs):
    """Every deployment test's run, started at once: a phase is mostly Flower's polling and process
    start-up (the CPU idles ~3/4 of the time), so concurrent runs cost little more than one.
    Each job stops its own processes, also when it fails; the fixture waits for every job."""
    root, config, _ = reference
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 at a time: 4 would make the CPU the bottleneck
        jobs = {"plain": pool.submit(plain_job, root, config), "fail": pool.submit(failing_job, root, config)}
        if certs is not None:
            jobs["tls"] = pool.submit(secure_job, root, config, certs)
        if HAS_RAY:
            jobs["sim"] = pool.submit(simulation_job, root, config)
        try:
            yield jobs
        finally:  # normally every job is done; after an interrupt this ends the runs still going
            for job in jobs.values():
                job.cancel()
            for d in LIVE:
                d.stop()


def assert_same_metrics(a: dict, b: dict) -> None:
    for ma, mb in ((a["models"], b["models"]), (a["last_round"]["models"], b["last_round"]["models"])):
        assert set(ma) == set(mb) == {"global", "personalized"}
        for model in ma:
            for site in SITES:
                for key in ("dice", "hd95", "assd"):
                    assert ma[model]["sites"][site][key] == pytest.approx(mb[model]["sites"][site][key], abs=1e-5)
            for key in ("dice", "hd95", "assd"):
                assert ma[model]["mean"][key] == pytest.approx(mb[model]["mean"][key], abs=1e-5)
    assert a["selection"] == b["selection"]
    assert a["last_round"]["round"] == b["last_round"]["round"]


def assert_same_metric_lines(run: Path, inprocess: Path) -> None:
    def key(line: dict) -> tuple:
        return line["round"], line["model"], line["split"], line["site"]

    def read(p: Path) -> list[dict]:
        return sorted((json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()), key=key)

    a, b = read(run), read(inprocess)
    assert [key(x) for x in a] == [key(x) for x in b]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)


def deploy_run(deployment: Deployment, config: Path, run_dir: Path) -> RunOutcome:
    return deployment.run(config, run_dir, overrides=OVERRIDES, nodes=len(SITES), timeout=300)


def completed(job: Job) -> Job:
    assert job.outcome.completed, f"status {job.outcome.status}:\n{job.outcome.output[-3000:]}\n{job.logs[-3000:]}"
    return job


def test_loopback_deployment_matches_in_process(reference, deployments):
    root, _, expected = reference
    completed(deployments["plain"].result())
    run = root / "run-plain"
    assert_same_metrics(json.loads((run / "results.json").read_text()), expected)
    assert_same_metric_lines(run, root / "inprocess")
    for name in ("config.yaml", "manifest.json", "report.md", "run.log", "checkpoints/last.safetensors"):
        assert (run / name).exists(), name
    assert json.loads((run / "manifest.json").read_text())["engine"] == "flower"


def iopfl_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iopfl.cli", *args], capture_output=True, text=True, timeout=300)


def test_only_sites_that_opted_in_publish_and_adapt_routes_over_them(reference, deployments, tmp_path):
    root, _, _ = reference
    completed(deployments["plain"].result())
    run = root / "run-plain"
    results = json.loads((run / "results.json").read_text())
    assert results["published"] == ["SiteA", "SiteB"]
    assert sorted(p.name for p in (run / "experts").iterdir()) == ["SiteA.safetensors", "SiteB.safetensors"]
    # SiteC kept its selected model in its own state folder, on its machine
    store = root / "home-plain" / "site-state" / "SiteC" / f"{results_key(run)}-SiteC"
    assert any(k.startswith("best/SiteC/") for k in SiteStateStore(store).latest()[0])
    # overlays (eval.overlays=1: the first site's) are drawn at the site, never in the run directory
    assert list((root / "home-plain" / "site-state" / "SiteA").glob("*-SiteA/overlays/*.png"))
    assert not (store / "overlays").exists() and not (run / "plots" / "overlays").exists()
    out = tmp_path / "adapted"
    done = iopfl_cli("adapt", str(run), "--target", HOLDOUT, "--method", "all", "--out", str(out))
    assert done.returncode == 0, done.stderr
    adapted = json.loads((out / "results.json").read_text())
    assert set(adapted["models"]) == {"global", "bn", "tent", "ensemble", "iopfl"}
    assert adapted["experts"] == ["global", "SiteA", "SiteB"]  # routing over 3 experts


def results_key(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["run_key"]


def test_predict_uses_a_published_model_or_the_sites_own_state(reference, deployments, tmp_path):
    root, _, _ = reference
    completed(deployments["plain"].result())
    run = root / "run-plain"
    scan = next((root / "cache").glob(f"synthetic-*/{HOLDOUT}/Case00.nii.gz"))
    assert iopfl_cli("predict", str(run), str(scan), "--site", "SiteA", "--out", str(tmp_path / "a")).returncode == 0
    refused = iopfl_cli("predict", str(run), str(scan), "--site", "SiteC", "--out", str(tmp_path / "c"))
    assert refused.returncode == 2 and "did not publish" in refused.stderr and "--state-dir" in refused.stderr
    assert not (tmp_path / "c").exists()
    state = root / "home-plain" / "site-state" / "SiteC"
    done = iopfl_cli(
        "predict", str(run), str(scan), "--site", "SiteC", "--out", str(tmp_path / "c"), "--state-dir", str(state)
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "Case00.nii.gz").exists()


def test_without_an_opt_in_routing_is_refused_before_anything_is_written(reference, deployments, tmp_path):
    root, _, _ = reference
    completed(deployments["fail"].result())
    run = root / "run-fail"
    assert json.loads((run / "results.json").read_text())["published"] == []
    out = tmp_path / "adapted"
    done = iopfl_cli("adapt", str(run), "--target", HOLDOUT, "--method", "iopfl", "--out", str(out))
    assert done.returncode == 2 and "publish-personal='true'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())
    assert iopfl_cli("adapt", str(run), "--target", HOLDOUT, "--method", "bn", "--out", str(out)).returncode == 0


def test_resuming_a_flower_run_in_process_is_refused(reference, deployments):
    root, config, _ = reference
    completed(deployments["plain"].result())
    done = iopfl_cli("train", str(config), "--out", str(root / "run-plain"), "--resume")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "last.safetensors" in done.stderr and "Flower deployment" in done.stderr


def tls_job(deployments) -> Job:
    if "tls" not in deployments:
        pytest.skip("needs openssl and ssh-keygen (scripts/make_certs.sh)")
    return deployments["tls"].result()


def test_tls_deployment_with_supernode_auth_matches_in_process(reference, deployments):
    root, _, expected = reference
    job = completed(tls_job(deployments))
    assert_same_metrics(json.loads((root / "run-tls" / "results.json").read_text()), expected)
    assert "insecure" not in job.logs.lower() and "authentication is disabled" not in job.logs


def test_supernode_with_unregistered_key_is_refused(deployments):
    job = tls_job(deployments)
    assert job.extra["intruder_exit"] != 0
    assert "Failed to initialize the connection" in job.extra["intruder_log"]


def test_a_failing_site_is_left_out_and_logged(reference, deployments):
    root, _, expected = reference
    job = completed(deployments["fail"].result())
    log = (root / "run-fail" / "run.log").read_text()
    assert "round 2: site SiteB is left out of training: it failed: " in log and "injected failure at round 2" in log
    assert "round 2 train: 2/3 sites replied" in log
    assert "site SiteB is left out of training" in job.outcome.output  # also in the streamed server log
    results = json.loads((root / "run-fail" / "results.json").read_text())
    assert results["last_round"]["round"] == 2 and set(results["models"]["global"]["sites"]) == set(SITES)
    lines = [json.loads(x) for x in (root / "run-fail" / "metrics.jsonl").read_text().splitlines()]
    assert {x["site"] for x in lines if x["round"] == 2 and x["model"] == "local"} == {"SiteA", "SiteC"}
    # round 2 aggregated A and C only, so its global model differs from the run where B took part
    ours = results["last_round"]["models"]["global"]["sites"]["SiteA"]["dice"]
    assert ours != expected["last_round"]["models"]["global"]["sites"]["SiteA"]["dice"]


def test_simulation_runtime_matches_in_process(reference, deployments):
    root, _, expected = reference
    if not HAS_RAY:
        pytest.skip("Flower's simulation extra is not installed (pip install 'flwr[simulation]')")
    completed(deployments["sim"].result())
    assert_same_metrics(json.loads((root / "run-sim" / "results.json").read_text()), expected)


def test_a_config_error_ends_the_server_app_in_one_line(tmp_path):
    """A moved config key on a deployment: the run ends as failed with the CLI's one-line message in
    Flower's run log — no traceback, no "unhandled exception" — and no run directory is written."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(tmp_path / "cache")))
    with deployment(tmp_path / "home") as d:  # stopped by PID, also when an assertion fails
        d.start_superlink()
        outcome = d.run(config, tmp_path / "run", overrides=["train.precision=bf16"], timeout=300)
        logs = d.log_text()
    message = "config key 'train.precision': moved: use runtime.precision"
    assert outcome.status == "finished:failed", outcome.output[-3000:]
    lines = [line for line in outcome.output.splitlines() if message in line]
    assert len(lines) == 1 and "[iopfl] error:" in lines[0], outcome.output[-3000:]
    for text in (outcome.output, logs):
        assert "Traceback" not in text and "unhandled exception" not in text.lower(), text[-3000:]
    assert not (tmp_path / "run").exists()


# --- what a site sends (unit level: the ClientApp's handlers with a Message and a Context) ------

HANDLERS = {
    "query": flower_client.query,
    "query.publish": flower_client.publish,
    "train": flower_client.train,
    "evaluate": flower_client.evaluate,
}


def handle(msg: Message, context: Context) -> Message:
    """One message to the ClientApp's handler for it, as the ClientApp dispatches it."""
    return HANDLERS[msg.metadata.message_type](msg, context)


@pytest.fixture
def task_identity(monkeypatch):
    """What a ClientApp process has set when Flower runs it (replies take their metadata from it)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.mark.parametrize("method", ["iopfl", "fedbn", "silobn", "fedper"])
def test_a_site_sends_only_shared_weights_count_and_metrics(reference, tmp_path, task_identity, method):
    root = reference[0]
    cfg = tiny_config(root / "cache", [*OVERRIDES, f"fl.method={method}"], sites=4)
    spec = load_dataset(cfg.data)
    site = make_client(cfg, Runtime.resolve(cfg.runtime), spec, "SiteA", spec.sites["SiteA"], spec.sites["SiteA"].train)
    weights = initial_weights(cfg, site.build)
    shared = set(
        build_strategy(method).client_round(site.trainer, weights, {}, torch.Generator().manual_seed(0)).weights
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site": "SiteA", "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config={},
    )
    config_json = json.dumps(cfg.model_dump(mode="json"))
    sent = {}
    for round_ in (1, 2):
        msg = Message(
            wire.instruction(config_json, round_, "run-key", weights), dst_node_id=1, message_type=MessageType.TRAIN
        )
        reply = handle(msg, context)
        assert set(reply.content.keys()) == {"arrays", "metrics", "info"}
        assert set(reply.content["arrays"].keys()) == {"index", "data"}
        names = wire.record_weight_names(reply.content["arrays"])
        assert set(names) == shared  # exactly what the strategy shares: θ_k (IOP-FL), no norm layers (FedBN)
        assert set(reply.content["metrics"].keys()) == {"num-examples", "loss"}
        assert reply.content["metrics"]["num-examples"] == site.trainer.num_samples
        assert dict(reply.content["info"]) == {"site": "SiteA"}
        sent = wire.record_weights(reply.content["arrays"])
        payload = reply.content["arrays"]["data"].numpy().nbytes  # no bytes beyond those tensors
        assert payload == sum(t.numel() * t.element_size() for t in sent.values())
    if method == "fedbn":
        from iopfl.fl.fedbn import norm_state_keys

        norm = norm_state_keys(site.build())
        assert norm and shared.isdisjoint(norm) and shared | norm == set(weights)
    # what stays behind: the personal state, in the site's own store, never in a reply
    kept, _ = SiteStateStore(tmp_path / "state" / "run-key-SiteA").load_before(3, TRAIN)
    personal = {k.split("/", 2)[2]: v for k, v in kept.items() if k.startswith("personal/SiteA/")}
    assert personal
    if method == "iopfl":  # φ_k = α·φ_k + (1−α)·θ_k differs from the θ_k sent in round 2
        assert any(not torch.equal(personal[k], sent[k]) for k in sent if sent[k].is_floating_point())

    evaluate = Message(
        wire.instruction(config_json, 2, "run-key", weights), dst_node_id=1, message_type=MessageType.EVALUATE
    )
    reply = handle(evaluate, context)
    assert set(reply.content.keys()) == {"info"}
    info = wire.read_info(reply.content)
    assert set(info) == {"site", "scores", "best"}
    assert set(info["best"]) == {"round", "val", "test"}  # a summary: the selected model stays here


def test_state_store_replays_a_round_from_the_state_before_it(tmp_path):
    store = SiteStateStore(tmp_path / "s")
    assert store.load_before(1, TRAIN) is None
    for round_ in (1, 2, 3):
        store.save(round_, TRAIN, {"w": torch.tensor([float(round_)])}, {"best": round_})
        store.save(round_, EVALUATE, {"w": torch.tensor([round_ + 0.5])}, {"best": round_})
    # the server resumed from its round-2 checkpoint and sends round 3 again
    tensors, meta = store.load_before(3, TRAIN)
    assert tensors["w"].item() == 2.5 and meta["best"] == 2
    store.save(3, TRAIN, {"w": torch.tensor([30.0])}, {"best": 3})  # the replayed attempt replaces the old one
    tensors, _ = store.load_before(3, EVALUATE)
    assert tensors["w"].item() == 30.0
    assert store.load_before(4, TRAIN)[0]["w"].item() == 30.0  # (3, evaluate) of the old attempt is gone
    with pytest.raises(RuntimeError, match="stale"):
        store.check_not_stale(1)
    store.check_not_stale(3)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["r000001-1.safetensors", "r000002-0.safetensors", "r000002-1.safetensors", "r000003-0.safetensors"]


def test_weights_travel_packed_and_bit_exact():
    weights = {
        "a": torch.randn(3, 4),
        "n": torch.tensor(7),
        "e": torch.zeros(0),
        "h": torch.randn(5).to(torch.bfloat16),
    }
    record = wire.weights_record(weights)
    assert set(record.keys()) == {"index", "data"}
    back = wire.record_weights(record)
    assert list(back) == list(weights)
    for k, v in weights.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
    assert wire.record_weights(wire.weights_record({})) == {}


# --- the ServerApp's logic on an in-process grid (fast: no Flower processes) ---------------------


class LocalGrid:
    """A stand-in for Flower's Grid: messages go straight to the ClientApp's handlers, in-process.

    ``offline``: nodes that have left; ``silent``: nodes that never answer; ``crash``: (kind, round)
    at which pushing raises, as a server dying at that point would; a node config ``fail-at-round=N``
    makes that node's ClientApp raise in round N's training (as ``_faulty_client`` does on a deployment).
    """

    def __init__(self, node_configs: dict[int, dict], crash: tuple[str, int] | None = None):
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=nc, state=RecordDict(), run_config={})
            for n, nc in node_configs.items()
        }
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.crash = crash
        self.outbox: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.replies: list[tuple[int, Message]] = []  # (node, reply) of every message a site answered
        self.on_push = lambda kind, round_: None

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            round_ = int(msg.content["config"]["round"])
            if self.crash == (msg.metadata.message_type, round_):
                raise RuntimeError("the server died here")
            if i == 0:
                self.on_push(msg.metadata.message_type, round_)
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                ids.append(msg.metadata.message_id)
                continue
            if node in self.offline:  # the SuperLink answers for a node that stopped sending heartbeats
                self.outbox[msg.metadata.message_id] = Message(
                    Error(code=5, reason="Error: Node Unavailable"), reply_to=msg
                )
                ids.append(msg.metadata.message_id)
                continue
            try:
                if msg.metadata.message_type == MessageType.TRAIN:
                    fail_if_asked(self.contexts[node], round_)
                reply = handle(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 — what flwr-clientapp does with any exception
                reply = Message(Error(code=0, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
            self.outbox[msg.metadata.message_id] = reply
            self.replies.append((node, reply))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def local_grid(root: Path, tmp: Path, **node_extra) -> LocalGrid:
    return LocalGrid(
        {i: {"site": s, "state-dir": str(tmp / "state"), **node_extra.get(s, {})} for i, s in enumerate(SITES, 1)},
        crash=node_extra.get("crash"),
    )


def grid_run(root: Path, config: Path, run_dir: Path, grid: LocalGrid, extra: list[str] = (), **settings) -> dict:
    from iopfl.config import load_config

    base = {"join_timeout": 1, "reply_timeout": 5, "poll_interval": 0.01, **settings}
    overrides = [*OVERRIDES, *extra]
    return flower_run(load_config(config, overrides), Settings(config, run_dir, overrides, **base), grid).run(
        resume=True
    )


def test_server_app_on_a_local_grid_matches_in_process(reference, tmp_path, task_identity):
    root, config, expected = reference
    grid = local_grid(root, tmp_path)
    results = grid_run(root, config, tmp_path / "run", grid)
    assert_same_metrics(results, expected)
    assert_same_metric_lines(tmp_path / "run", root / "inprocess")
    # what the server sent: global weights, the round, the run key and the config; nothing else
    for msg in grid.sent:
        assert set(msg.content.keys()) <= {"arrays", "config"}
        extra = {"overlay"} if msg.metadata.message_type == "query.publish" else set()
        assert set(msg.content["config"].keys()) == {"round", "run-key", "iopfl-config"} | extra


def test_a_site_that_did_not_opt_in_never_sends_its_personal_model(reference, tmp_path, task_identity):
    root, config, _ = reference
    opt_in = {"publish-personal": "true"}
    grid = local_grid(root, tmp_path, SiteA=opt_in, SiteB=opt_in)
    results = grid_run(root, config, tmp_path / "run", grid)
    assert results["published"] == ["SiteA", "SiteB"]
    assert sorted(p.stem for p in (tmp_path / "run" / "experts").iterdir()) == ["SiteA", "SiteB"]
    key = json.loads((tmp_path / "run" / "manifest.json").read_text())["run_key"]
    kept, _ = SiteStateStore(tmp_path / "state" / f"{key}-SiteC").latest()
    personal = {k.removeprefix("best/SiteC/"): v for k, v in kept.items() if k.startswith("best/SiteC/")}
    assert personal
    from_c = [reply for node, reply in grid.replies if node == 3]
    assert {r.metadata.message_type for r in from_c} >= {"train", "evaluate", "query.publish"}
    for reply in from_c:  # no tensor SiteC ever sent is one of its selected personalised model's
        sent = wire.record_weights(reply.content["arrays"]) if "arrays" in reply.content else {}
        assert not any(torch.equal(v, personal[k]) for k, v in sent.items() if v.is_floating_point())
    published = [reply for node, reply in grid.replies if reply.metadata.message_type == "query.publish"]
    assert sorted("arrays" in r.content for r in published) == [False, True, True]
    expert, _ = load_checkpoint(tmp_path / "run" / "experts" / "SiteA.safetensors")
    kept_a, _ = SiteStateStore(tmp_path / "state" / f"{key}-SiteA").latest()
    assert all(torch.equal(v, kept_a[f"best/SiteA/{k}"]) for k, v in expert.items())


def test_a_server_that_dies_mid_round_resumes_exactly(reference, tmp_path, task_identity):
    """The server dies after the sites trained round 2 (their round-2 state is saved) but before its
    round-2 checkpoint; the restarted server replays round 2 and ends with the uninterrupted numbers."""
    root, config, expected = reference
    with pytest.raises(RuntimeError, match="the server died"):
        grid_run(root, config, tmp_path / "run", local_grid(root, tmp_path, crash=("evaluate", 2)))
    _, state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert state["round"] == 1
    assert (tmp_path / "state" / f"{state['run_key']}-SiteA" / "r000002-0.safetensors").exists()
    results = grid_run(root, config, tmp_path / "run", local_grid(root, tmp_path))  # a new server process
    assert "resumed from" in (tmp_path / "run" / "run.log").read_text()
    assert_same_metrics(results, expected)
    assert_same_metric_lines(tmp_path / "run", root / "inprocess")
    assert_events_match_metrics(tmp_path / "run")  # the server's TensorBoard: round 2 once


def test_stop_after_round_then_resume(reference, tmp_path, task_identity, monkeypatch):
    """The server stops, as a crash would, right after checkpointing round 1; run again, it resumes."""
    root, config, expected = reference
    save = Federation._save

    def save_then_stop(self):
        save(self)
        if self.round == 1:
            raise RuntimeError("stopped after checkpointing round 1")

    monkeypatch.setattr(Federation, "_save", save_then_stop)
    with pytest.raises(RuntimeError, match="after checkpointing round 1"):
        grid_run(root, config, tmp_path / "run", local_grid(root, tmp_path))
    monkeypatch.setattr(Federation, "_save", save)
    assert_same_metrics(grid_run(root, config, tmp_path / "run", local_grid(root, tmp_path)), expected)


def test_sites_that_fail_or_fall_silent_are_left_out_until_too_few_reply(reference, tmp_path, task_identity):
    root, config, _ = reference
    grid = local_grid(root, tmp_path, SiteA={"fail-at-round": 1})
    grid.on_push = lambda kind, round_: kind == MessageType.TRAIN and grid.silent.add(3)  # SiteC falls silent
    with pytest.raises(UserError, match="round 1: 1 of 3 sites replied, fewer than fl.min_clients=2"):
        grid_run(root, config, tmp_path / "run", grid, reply_timeout=0.3, extra=["fl.min_clients=2"])
    log = (tmp_path / "run" / "run.log").read_text()
    assert "round 1: site SiteA is left out of training: it failed: " in log and "injected failure" in log
    assert "round 1: site SiteC is left out of training: no train reply within 0.3 s" in log


def test_a_site_that_disconnects_is_left_out_and_rejoins(reference, tmp_path, task_identity):
    """SiteB's SuperNode dies during round 1 and comes back (as a new node) during round 2."""
    root, config, _ = reference
    grid = local_grid(root, tmp_path)

    def events(kind: str, round_: int) -> None:
        if (kind, round_) == (MessageType.TRAIN, 1):
            grid.offline.add(2)
        if (kind, round_) == (MessageType.EVALUATE, 2):
            grid.contexts[4] = Context(
                run_id=1, node_id=4, node_config=dict(grid.contexts[2].node_config), state=RecordDict(), run_config={}
            )

    grid.on_push = events
    results = grid_run(root, config, tmp_path / "run", grid, extra=["fl.rounds=3"])
    log = (tmp_path / "run" / "run.log").read_text()
    assert "round 1: site SiteB is left out of training: it failed: " in log and "Node Unavailable" in log
    assert "site SiteB: its SuperNode (node 2) is offline" in log
    assert "round 2: site SiteB is left out of training: no SuperNode online" in log
    assert "round 2: not every site was evaluated; model selection skips this round" in log
    assert "round 3 train: 3/3 sites replied" in log
    assert results["last_round"]["round"] == 3 and set(results["models"]["personalized"]["sites"]) == set(SITES)


def test_run_config_paths_are_made_absolute_where_the_server_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = Settings.from_run_config({})
    assert default.config == CONFIG_DIR / "demo.yaml" and default.config.is_file()  # the packaged demo
    assert default.run_dir == tmp_path / "runs" / "flower"
    given = Settings.from_run_config({"config": "mine.yaml", "run-dir": "/r", "overrides": "a=1; b=2"})
    assert (given.config, given.run_dir, given.overrides) == (tmp_path / "mine.yaml", Path("/r"), ["a=1", "b=2"])
    with pytest.raises(UserError, match="run-dir"):
        Settings.from_run_config({"run-dir": " "})
