"""The ServerApp: the coordinator's side of a Flower deployment, driving the same strategy classes.

Run config (``flwr run APP CONNECTION --run-config "config='...' run-dir='...'"``; defaults in
``app/pyproject.toml``):

- ``config``: the iopfl YAML on the server machine; ``overrides``: ``;``-separated ``key=value``.
- ``run-dir``: the run directory (same layout as ``iopfl train``). If it holds a checkpoint, the run
  continues from it: restarting the server resumes a run.
- ``nodes``: SuperNodes to wait for before the first round (default: the configured sites, else
  ``fl.min_clients``); ``join-timeout``: how long to wait for them (s, default 300).
- ``reply-timeout``: how long a round waits for its replies (s, default 600); a site silent for
  that long is left out of the round. ``poll-interval``: seconds between reply polls (default 0.25).
- ``stop-after-round``: TESTING ONLY — the ServerApp stops (raises) right after checkpointing that
  round, as a crash would; running again with the same run-dir resumes.

Per round: sample sites (seeded by the round, as in-process), send them the global weights, aggregate
the replies in site order (the in-process order, so the float sums match exactly). A site that
raises, disconnects or stays silent is left out of that round and named, with the reason, in the
log and in ``RUN/run.log``; the run stops if fewer than ``fl.min_clients`` reply. Evaluation rounds
ask every site for its scores and the summary of its val-selected personalised model (the model
stays at the site). The server state is checkpointed atomically after every round.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from iopfl.config import Config, load_config
from iopfl.engine.checkpoint import load_checkpoint, save_checkpoint
from iopfl.engine.flower import wire
from iopfl.engine.rundir import RunDir, manifest
from iopfl.engine.runner import (
    Coordinator,
    initial_weights,
    is_eval_round,
    metric_lines,
    sample_clients,
)
from iopfl.errors import UserError
from iopfl.fileio import atomic_write_text
from iopfl.fl import build_strategy
from iopfl.models import build_model

app = ServerApp()
log = logging.getLogger("flwr")  # Flower's logger: shown by `flwr run --stream` and in `flwr log`
FORMAT = 1
QUERY_TIMEOUT = 120.0  # s: a query only starts the ClientApp and reads the site's data settings


@dataclass
class Settings:
    """The ServerApp's run config."""

    config: Path
    run_dir: Path
    overrides: list[str]
    nodes: int = 0
    join_timeout: float = 300.0
    reply_timeout: float = 600.0
    poll_interval: float = 0.25
    stop_after_round: int = 0

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> Settings:
        if not str(rc.get("config", "")).strip() or not str(rc.get("run-dir", "")).strip():
            raise UserError("run config needs config='<iopfl yaml>' and run-dir='<run directory>'")
        raw = str(rc.get("overrides", "")).strip()
        return cls(Path(str(rc["config"])).expanduser(), Path(str(rc["run-dir"])).expanduser(),
                   [x.strip() for x in raw.split(";") if x.strip()],
                   nodes=int(rc.get("nodes", 0)), join_timeout=float(rc.get("join-timeout", 300)),
                   reply_timeout=float(rc.get("reply-timeout", 600)),
                   poll_interval=float(rc.get("poll-interval", 0.25)),
                   stop_after_round=int(rc.get("stop-after-round", 0)))


class FlowerRun:
    """One federated run over the SuperNodes of a Flower grid, writing the run directory."""

    def __init__(self, cfg: Config, settings: Settings, grid: Grid):
        self.cfg, self.settings, self.grid = cfg, settings, grid
        self.dir = RunDir(settings.run_dir)
        self.config_json = json.dumps(cfg.model_dump(mode="json"))
        self.strategy = build_strategy(cfg.fl.method, cfg.fl.strategy_config())
        if self.strategy.pooled:
            raise UserError(f"fl.method={cfg.fl.method} pools every site's data in one place: not a "
                            "federated method, so it has no Flower deployment (use `iopfl train`)")
        self.nodes: dict[str, int] = {}       # site -> node id of the SuperNode serving it
        self.ignored: set[int] = set()        # nodes that serve no training site of this run
        self.sites: list[str] = []            # training sites, in the in-process order
        self.network: dict[str, Any] | None = None
        self.best: dict[str, Any] = {}        # site -> summary of its val-selected personalised model
        self.run_key = ""

    # --- logging ----------------------------------------------------------------------------------
    def _log(self, level: int, text: str) -> None:
        log.log(level, "[iopfl] %s", text)
        with (self.dir.path / "run.log").open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'WARNING ' if level >= logging.WARNING else ''}{text}\n")

    def note(self, text: str) -> None:
        self._log(logging.WARNING, text)

    def info(self, text: str) -> None:
        self._log(logging.INFO, text)

    # --- messaging ------------------------------------------------------------------------------
    def _message(self, kind: str, node: int, round_: int, weights=None) -> Message:
        # the TTL ends when the server stops waiting: a node back later never gets a stale round
        return Message(wire.instruction(self.config_json, round_, self.run_key, weights), dst_node_id=node,
                       message_type=kind, group_id=str(round_), ttl=max(self.settings.reply_timeout, 10.0))

    def _exchange(self, messages: dict[Any, Message], timeout: float | None = None) -> dict[Any, Message]:
        """Push, then pull every ``poll_interval`` s until every reply arrived or ``reply_timeout``.

        (``Grid.send_and_receive`` sleeps 3 s between pulls; a phase here ends as soon as it can.)
        Replies are matched to their key by message id, so the SuperLink's own error replies for an
        unreachable node are matched too.
        """
        if not messages:
            return {}
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        key_of = {i: k for k, i in zip(keys, ids) if i}
        pending = set(key_of)
        replies: dict[Any, Message] = {}
        deadline = time.monotonic() + (self.settings.reply_timeout if timeout is None else timeout)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                mid = reply.metadata.reply_to_message_id
                if mid in key_of:
                    replies[key_of[mid]] = reply
                    pending.discard(mid)
            if pending:
                time.sleep(self.settings.poll_interval)
        return replies

    def send(self, kind: str, targets: dict[str, int], round_: int, weights=None) -> dict[str, Message]:
        """One message per site; the good replies by site. Every failure is noted with its reason."""
        start = time.monotonic()
        replies = self._exchange({s: self._message(kind, node, round_, weights) for s, node in targets.items()})
        good = {}
        for site in targets:
            reply = replies.get(site)
            if reply is None:
                self.note(f"round {round_}: site {site} sent no {kind} reply within "
                          f"{self.settings.reply_timeout:g} s and is left out")
            elif reply.has_error():
                self.note(f"round {round_}: site {site} failed during {kind} and is left out: "
                          f"{reply.error.reason} (Flower error code {reply.error.code})")
            else:
                good[site] = reply
        self.info(f"round {round_} {kind}: {len(good)}/{len(targets)} sites replied "
                  f"in {time.monotonic() - start:.1f} s")
        return good

    # --- which SuperNode serves which site ------------------------------------------------------
    def _online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def _query(self, node_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Ask nodes which site they serve. A node that fails or stays silent is left aside for the
        rest of the run (a restarted SuperNode comes back with a new node id and is asked again)."""
        node_ids = list(node_ids)
        timeout = min(self.settings.reply_timeout, QUERY_TIMEOUT)
        replies = self._exchange({n: self._message(MessageType.QUERY, n, 0) for n in node_ids}, timeout)
        infos = {}
        for node in node_ids:
            reply = replies.get(node)
            if reply is None:
                self.note(f"node {node} did not say which site it serves within {timeout:g} s; it takes no part")
            elif reply.has_error():
                self.note(f"node {node} could not join: {reply.error.reason}")
            else:
                infos[node] = wire.read_info(reply.content)
                continue
            self.ignored.add(node)
        return infos

    def _adopt(self, infos: dict[int, dict[str, Any]], allowed: list[str] | None) -> None:
        """Map sites to the queried nodes (a site's newest node replaces an older one)."""
        holdout = self.cfg.data.holdout
        for node, info in sorted(infos.items()):
            site = info["site"]
            if site == holdout or (allowed is not None and site not in allowed):
                why = "the held-out site" if site == holdout else "not a site of this run"
                self.note(f"node {node} serves {site}: {why}; it takes no part")
                self.ignored.add(node)
                continue
            if site in self.nodes and self.nodes[site] != node:
                self.note(f"site {site} is now served by node {node} (was node {self.nodes[site]})")
            self.nodes[site] = node
            self.network = self.network or info["network"]
            if info["network"] != self.network:
                raise UserError(f"site {site}: its data needs network {info['network']}, "
                                f"other sites {self.network} (same data settings everywhere?)")

    def discover(self, known_sites: list[str] | None) -> None:
        """Wait for the SuperNodes, learn which site each serves, and fix the run's site order."""
        cfg = self.cfg
        wanted = [s for s in (known_sites or cfg.data.sites or []) if s != cfg.data.holdout]
        expected = self.settings.nodes or len(wanted) or cfg.fl.min_clients
        deadline = time.monotonic() + self.settings.join_timeout
        online = self._online()
        while len(online) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
            online = self._online()
        if len(online) < expected:
            self.note(f"{len(online)} of {expected} expected SuperNodes joined within "
                      f"{self.settings.join_timeout:g} s; starting with them")
        if not self.settings.nodes and not wanted:
            self.note(f"run config 'nodes' is not set: the run's sites are those of the {len(online)} "
                      "SuperNode(s) online now; set nodes=<number of sites> to wait for every site")
        self._adopt(self._query(online), known_sites or cfg.data.sites)
        # the in-process order: the configured sites, else sorted by name (as sites are discovered)
        self.sites = list(known_sites) if known_sites else (wanted or sorted(self.nodes))
        missing = [s for s in self.sites if s not in self.nodes]
        if missing:
            self.note(f"no SuperNode serves {', '.join(missing)} yet")
        if len(self.nodes) < cfg.fl.min_clients:
            raise UserError(f"only {len(self.nodes)} site(s) joined ({', '.join(self.nodes) or 'none'}); "
                            f"fl.min_clients is {cfg.fl.min_clients}")
        self.info(f"sites: {', '.join(f'{s} (node {self.nodes[s]})' for s in self.sites if s in self.nodes)}")

    def refresh(self) -> None:
        """Between rounds: adopt SuperNodes that (re)joined, forget those that went offline."""
        online = self._online()
        for site, node in list(self.nodes.items()):
            if node not in online:
                self.note(f"site {site}: its SuperNode (node {node}) is offline")
                del self.nodes[site]
        new = online - set(self.nodes.values()) - self.ignored
        if new:
            self._adopt(self._query(new), self.sites)

    def _targets(self, sites: list[str], round_: int, kind: str) -> dict[str, int]:
        absent = [s for s in sites if s not in self.nodes]
        for site in absent:
            self.note(f"round {round_}: site {site} has no SuperNode online and is left out of {kind}")
        return {s: self.nodes[s] for s in sites if s in self.nodes}

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.dir.create()
        state = self._checkpoint_state()
        self.run_key = state["run_key"] if state else uuid.uuid4().hex[:16]
        if state and state["server"]["round"] >= self.cfg.fl.rounds:  # finished: only rewrite the results
            self.sites = state["sites"]
        else:
            self.discover(state["sites"] if state else None)
        if state:
            self.network = state["network"]
        n = self.network
        build = lambda: build_model(n["in_channels"], n["num_classes"], n["width"], n["depth"])
        server = Coordinator(self.strategy, initial_weights(self.cfg, build), self.sites)
        if state:
            self._resume(server, state)
        else:
            self._start()
        while server.round < self.cfg.fl.rounds:
            round_ = server.round + 1
            if round_ > 1:
                self.refresh()
            self._train(server, round_)
            server.round = round_
            if is_eval_round(self.cfg, round_):
                self._evaluate(server, round_)
            self._save(server)
            if self.settings.stop_after_round == round_:
                raise RuntimeError(f"stop-after-round={round_}: stopping as a crash would (testing)")
        if not server.last_eval:
            raise UserError("no round was evaluated by every site: no results to report")
        results = server.results(self.best, self.cfg.data.source, self.cfg)
        self.dir.write_json("results.json", results)
        self._report()
        self.info(f"run complete: {self.dir.path / 'results.json'}")
        return results

    def _train(self, server: Coordinator, round_: int) -> None:
        chosen = sample_clients(self.cfg, self.sites, round_)
        replies = self.send(MessageType.TRAIN, self._targets(chosen, round_, "training"), round_,
                            server.global_weights)
        sent = {}
        for site in (s for s in chosen if s in replies):  # the in-process aggregation order
            reply_site, weights, n, metrics = wire.read_train_reply(replies[site].content)
            if reply_site != site:
                self.note(f"round {round_}: node {self.nodes.get(site)} answered for {reply_site}, not {site}; "
                          "left out")
                continue
            sent[site] = (weights, n, metrics)
        if len(sent) < self.cfg.fl.min_clients:
            raise UserError(f"round {round_}: {len(sent)} of {len(chosen)} sites replied, "
                            f"fewer than fl.min_clients={self.cfg.fl.min_clients}; stopping")
        server.aggregate([(w, n) for w, n, _ in sent.values()])
        self.dir.append_metrics([{"round": round_, "model": "local", "split": "train", "site": s,
                                  "loss": m.get("loss", float("nan"))} for s, (_, _, m) in sent.items()])

    def _evaluate(self, server: Coordinator, round_: int) -> None:
        targets = self._targets(self.sites, round_, "evaluation")
        replies = self.send(MessageType.EVALUATE, targets, round_, server.global_weights)
        infos = {s: wire.read_info(r.content) for s, r in replies.items()}
        for site, info in infos.items():
            self.best[site] = info["best"]
        if len(infos) < len(self.sites):
            self.note(f"round {round_}: not every site was evaluated; model selection skips this round")
            return
        scores = {s: infos[s]["scores"] for s in self.sites}
        server.record(round_, scores)
        self.dir.append_metrics(metric_lines(round_, scores))

    # --- run directory, checkpoint, resume ------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any] | None:
        if not self.dir.checkpoint.exists():
            return None
        self._tensors, state = load_checkpoint(self.dir.checkpoint)
        if state.get("engine") != "flower":
            raise UserError(f"{self.dir.checkpoint}: written by `iopfl train`, not by the Flower engine; "
                            "use another run-dir")
        if state.get("config_hash") != self.cfg.digest():
            raise UserError(f"{self.dir.checkpoint}: written with a different config; resume with the "
                            "run's own config.yaml or use another run-dir")
        return state

    def _start(self) -> None:
        atomic_write_text(self.dir.path / "config.yaml", self.cfg.to_yaml())
        self.dir.write_json("manifest.json", {**manifest(self.cfg.seed, self.cfg.digest()), "engine": "flower",
                                              "run_key": self.run_key})
        self.dir.metrics.unlink(missing_ok=True)

    def _resume(self, server: Coordinator, state: dict[str, Any]) -> None:
        server.load_state(self._tensors, state["server"])
        self.best = state["best"]
        self.dir.trim_metrics(server.round)
        self.info(f"resumed from {self.dir.checkpoint} at round {server.round}")

    def _save(self, server: Coordinator) -> None:
        save_checkpoint(self.dir.checkpoint, server.state_tensors(),
                        {"format": FORMAT, "engine": "flower", "config_hash": self.cfg.digest(),
                         "method": self.strategy.name, "run_key": self.run_key, "sites": self.sites,
                         "network": self.network, "server": server.state(), "best": self.best})

    def _report(self) -> None:
        from iopfl.report.run_report import write_run_report  # matplotlib only when a run finishes

        write_run_report(self.dir.path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_run_config(dict(context.run_config))
    cfg = load_config(settings.config, settings.overrides)
    try:
        FlowerRun(cfg, settings, grid).run()
    except UserError as err:
        log.error("[iopfl] %s", err)
        raise
