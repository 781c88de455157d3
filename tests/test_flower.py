"""Flower deployment on loopback: same numbers as in-process, TLS, a failing site, what a client sends.

Every process is bound to 127.0.0.1, runs with telemetry and update checks off, and is stopped by PID
in the fixture's teardown (also when a test fails).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from _tiny import tiny_config, tiny_tree

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402

from iopfl.engine.flower import client as flower_client  # noqa: E402
from iopfl.engine.flower.deploy import Deployment, log_text  # noqa: E402
from iopfl.engine.flower.wire import content, record_json  # noqa: E402
from iopfl.engine.runner import FederatedRun  # noqa: E402

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SITES = ["SiteA", "SiteB", "SiteC"]
OVERRIDES = ["fl.rounds=2", "eval.eval_every=2"]  # fewer message phases: ~5 s of polling each


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The config file every deployment runs, and the in-process results for it."""
    root = tmp_path_factory.mktemp("flower")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(root / "cache")))
    # the in-process run also fills the data cache, so the SuperNodes never generate data concurrently
    results = FederatedRun(tiny_config(root / "cache", OVERRIDES), root / "inprocess").run()
    return root, config, results


def assert_same_metrics(a: dict, b: dict) -> None:
    for section in ("models", "last_round"):
        ma = a[section] if section == "models" else a[section]["models"]
        mb = b[section] if section == "models" else b[section]["models"]
        assert set(ma) == set(mb)
        for model in ma:
            for site in SITES:
                for key in ("dice", "hd95", "assd"):
                    assert ma[model]["sites"][site][key] == pytest.approx(mb[model]["sites"][site][key], abs=1e-5)
    assert a["selection"] == b["selection"]


def deploy_and_run(home: Path, config: Path, run_dir: Path, certs: Path | None = None, **node_extra) -> tuple[dict, str]:
    with Deployment(home, certs=certs) as d:
        d.start_superlink()
        for site in SITES:
            d.add_supernode(site, None, **node_extra.get(site, {}))
        try:
            d.run(config, run_dir, nodes=len(SITES), overrides=OVERRIDES, timeout=400)
        finally:
            logs = log_text(d)
    return json.loads((run_dir / "results.json").read_text()), logs


def test_loopback_deployment_matches_in_process(reference):
    root, config, expected = reference
    results, _ = deploy_and_run(root / "home-plain", config, root / "run-plain")
    assert_same_metrics(results, expected)
    assert (root / "run-plain" / "report.md").exists()
    assert (root / "run-plain" / "checkpoints" / "last.safetensors").exists()


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen")
def test_tls_deployment_matches_in_process(reference):
    root, config, expected = reference
    certs = root / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(certs)], check=True, capture_output=True)
    results, logs = deploy_and_run(root / "home-tls", config, root / "run-tls", certs=certs)
    assert_same_metrics(results, expected)
    assert "insecure" not in logs.split("Starting Flower SuperLink")[0].lower()


def test_a_failing_site_is_left_out_and_logged(reference):
    root, config, _ = reference
    results, _ = deploy_and_run(root / "home-fail", config, root / "run-fail", SiteB={"fail-at-round": 2})
    log = (root / "run-fail" / "run.log").read_text()
    assert "site SiteB failed during train" in log and "injected failure at round 2" in log
    assert results["last_round"]["round"] == 2 and set(results["models"]["global"]["sites"]) == set(SITES)


def test_a_client_sends_only_shared_weights_count_and_metrics(reference, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process would have set
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    root, config, _ = reference
    cfg = tiny_config(root / "cache", OVERRIDES)
    weights = FederatedRun(cfg, tmp_path / "init").server.global_weights
    context = Context(run_id=1, node_id=1, node_config={"site": "SiteA", "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    replies = []
    for round_ in (1, 2):
        body = content(weights, config=cfg.model_dump(mode="json"), round=round_, run_id="test")
        msg = Message(body, dst_node_id=1, message_type=MessageType.TRAIN)
        reply = flower_client.train(msg, context)
        replies.append(reply)
        assert set(reply.content.keys()) == {"weights", "info"}
        assert set(reply.content["weights"].keys()) == set(weights)  # IOP-FL sends θ_k: the model's keys
        info = record_json(reply.content["info"])
        assert set(info) == {"site", "num_samples", "metrics"} and set(info["metrics"]) == {"loss"}
    # what stays behind: φ_k (≠ θ_k from round 2 on) in the client's own state file, never in a reply
    state = next((tmp_path / "state").glob("*.safetensors"))
    from iopfl.engine.checkpoint import load_checkpoint

    kept, _ = load_checkpoint(state)
    sent = replies[1].content["weights"].to_torch_state_dict()
    phi = {k[len("personal/SiteA/"):]: v for k, v in kept.items() if k.startswith("personal/SiteA/")}
    assert phi and any(not torch.equal(phi[k], sent[k]) for k in sent if sent[k].is_floating_point())
