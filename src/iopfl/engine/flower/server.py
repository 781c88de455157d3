"""The ServerApp: the coordinator's side of a Flower deployment, driving the same strategy classes.

Run config (``flwr run ... --run-config``): ``config`` (path of the iopfl YAML on the server machine),
``run-dir`` (the run directory, as written by ``iopfl train``), ``overrides`` (``;``-separated
``key=value``), ``nodes`` (SuperNodes to wait for; default: ``fl.min_clients``), ``reply-timeout``
(seconds a round waits for its replies; default 600).

Per round: sample sites (seeded by the round, as in-process), send them the global weights, aggregate
the replies in site order (the in-process order, so the float sums match exactly); a site that fails
or does not answer is left out of that round and logged by name with the reason; the run stops if
fewer than ``fl.min_clients`` reply. Evaluation rounds ask every site for its scores and its
val-selected personalised model's summary (the model itself stays at the site). A checkpoint after
every round lets a restarted server continue where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from iopfl.config import Config, load_config
from iopfl.engine.checkpoint import load_checkpoint, save_checkpoint
from iopfl.engine.flower.wire import content, record_json, record_weights
from iopfl.engine.rundir import RunDir, manifest
from iopfl.engine.runner import Coordinator, initial_weights, is_eval_round, metric_lines, sample_clients
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import build_strategy
from iopfl.models import build_model
from iopfl.report.run_report import write_run_report

app = ServerApp()
log = logging.getLogger("flwr")  # Flower's logger: shown by `flwr run --stream`


class FlowerRun:
    def __init__(self, cfg: Config, run_dir: Path, grid: Grid, expected_nodes: int, reply_timeout: float):
        self.cfg, self.dir, self.grid = cfg, RunDir(run_dir), grid
        self.reply_timeout = reply_timeout  # a site silent for this long is left out of the round
        self.expected = max(expected_nodes, cfg.fl.min_clients)
        self.run_id = hashlib.sha256(f"{cfg.digest()}|{Path(run_dir).resolve()}".encode()).hexdigest()[:16]
        self.best: dict[str, Any] = {}

    # --- messaging ------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        log.warning(text)
        with (self.dir.path / "run.log").open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def send(self, kind: str, nodes: dict[str, int], round_: int, weights=None) -> dict[str, Message]:
        """Send one message per site; return the good replies by site, noting every failure."""
        body = {"config": self.cfg.model_dump(mode="json"), "round": round_, "run_id": self.run_id}
        msgs = {site: Message(content(weights, **body), dst_node_id=node, message_type=kind, group_id=str(round_))
                for site, node in nodes.items()}
        by_node = {node: site for site, node in nodes.items()}
        replies = {}
        for reply in self.grid.send_and_receive(list(msgs.values()), timeout=self.reply_timeout):
            site = by_node.get(reply.metadata.src_node_id, "?")
            if reply.has_error():
                self.note(f"round {round_}: site {site} failed during {kind}: {reply.error.reason}")
            else:
                replies[site] = reply
        for site in (s for s in nodes if s not in replies):
            self.note(f"round {round_}: site {site} left out of this round's {kind}")
        return replies

    def discover(self) -> dict[str, int]:
        """Wait for the SuperNodes and learn which site each one serves."""
        deadline = time.time() + 600
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.expected and time.time() < deadline:
            time.sleep(1)
            nodes = list(self.grid.get_node_ids())
        body = {"config": self.cfg.model_dump(mode="json"), "round": 0, "run_id": self.run_id}
        msgs = [Message(content(**body), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        sites, self.network = {}, None
        for reply in self.grid.send_and_receive(msgs, timeout=self.reply_timeout):
            if reply.has_error():
                self.note(f"node {reply.metadata.src_node_id} failed to join: {reply.error.reason}")
                continue
            info = record_json(reply.content["info"])
            sites[info["site"]] = reply.metadata.src_node_id
            self.network = info["network"]
        if len(sites) < self.cfg.fl.min_clients:
            raise UserError(f"only {len(sites)} site(s) joined; fl.min_clients is {self.cfg.fl.min_clients}")
        order = self.cfg.data.sites or sorted(sites)
        return {s: sites[s] for s in order if s in sites}

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        nodes = self.discover()
        sites = list(nodes)
        n = self.network
        build = lambda: build_model(n["in_channels"], n["num_classes"], n["width"], n["depth"])  # noqa: E731
        strategy = build_strategy(self.cfg.fl.method, self.cfg.fl.strategy_config())
        server = Coordinator(strategy, initial_weights(self.cfg, build), sites)
        self._open(server)
        while server.round < self.cfg.fl.rounds:
            round_ = server.round + 1
            self._train(server, {s: nodes[s] for s in sample_clients(self.cfg, sites, round_)}, round_)
            server.round = round_
            if is_eval_round(self.cfg, round_):
                self._evaluate(server, nodes, round_)
            save_checkpoint(self.dir.checkpoint, server.state_tensors(),
                            {"format": 1, "config_hash": self.cfg.digest(), "server": server.state(),
                             "best": self.best, "sites": sites, "network": n})
        results = server.results(self.best, self.cfg.data.source, self.cfg)
        self.dir.write_json("results.json", results)
        write_run_report(self.dir.path)
        return results

    def _train(self, server: Coordinator, chosen: dict[str, int], round_: int) -> None:
        replies = self.send(MessageType.TRAIN, chosen, round_, server.global_weights)
        if len(replies) < self.cfg.fl.min_clients:
            raise UserError(f"round {round_}: {len(replies)} of {len(chosen)} sites replied, "
                            f"fewer than fl.min_clients={self.cfg.fl.min_clients}")
        ordered = [s for s in chosen if s in replies]  # the in-process aggregation order
        infos = {s: record_json(replies[s].content["info"]) for s in ordered}
        server.aggregate([(record_weights(replies[s].content["weights"]), infos[s]["num_samples"]) for s in ordered])
        self.dir.append_metrics([{"round": round_, "model": "local", "split": "train", "site": s,
                                  "loss": infos[s]["metrics"].get("loss")} for s in ordered])

    def _evaluate(self, server: Coordinator, nodes: dict[str, int], round_: int) -> None:
        replies = self.send(MessageType.EVALUATE, nodes, round_, server.global_weights)
        infos = {s: record_json(r.content["info"]) for s, r in replies.items()}
        for site, info in infos.items():
            self.best[site] = info["best"]
        if len(infos) < len(nodes):
            self.note(f"round {round_}: evaluation incomplete; model selection skips this round")
            return
        scores = {s: infos[s]["scores"] for s in nodes}
        server.record(round_, scores)
        self.dir.append_metrics(metric_lines(round_, scores))

    def _open(self, server: Coordinator) -> None:
        self.dir.create()
        if self.dir.checkpoint.exists():
            tensors, state = load_checkpoint(self.dir.checkpoint)
            if state.get("config_hash") != self.cfg.digest():
                raise UserError(f"{self.dir.checkpoint}: written with a different config")
            server.load_state(tensors, state["server"])
            self.best = state["best"]
            self.dir.trim_metrics(server.round)
            self.note(f"resumed at round {server.round}")
            return
        atomic_write_text(self.dir.path / "config.yaml", self.cfg.to_yaml())
        self.dir.write_json("manifest.json", {**manifest(self.cfg.seed, self.cfg.digest()), "engine": "flower"})


def _overrides(run_config: dict) -> list[str]:
    raw = str(run_config.get("overrides", "")).strip()
    return [x.strip() for x in raw.split(";") if x.strip()]


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if "config" not in rc or "run-dir" not in rc:
        raise UserError("run config needs config='<iopfl yaml>' and run-dir='<run directory>'")
    cfg = load_config(Path(str(rc["config"])), _overrides(rc))
    FlowerRun(cfg, Path(str(rc["run-dir"])), grid, int(rc.get("nodes", 0)),
              float(rc.get("reply-timeout", 600))).run()
