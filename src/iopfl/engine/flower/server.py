"""The ServerApp: the coordinator's side of a Flower deployment — the federation core
(:mod:`iopfl.engine.federation`) over a transport that sends Flower messages (:class:`FlowerSites`).

Run config (``flwr run APP CONNECTION --run-config "config='...' run-dir='...'"``; the defaults are
written once, in ``app/pyproject.toml``):

- ``config``: the iopfl YAML on the server machine; ``overrides``: ``;``-separated ``key=value``.
- ``run-dir``: the run directory (same layout as ``iopfl train``). If it holds a checkpoint of a
  Flower run with the same config, the run continues from it: restarting the server resumes a run.
- ``nodes``: SuperNodes to wait for before the first round (default: the configured sites, else
  ``fl.min_clients``); ``join-timeout``: how long to wait for them (s, default 300).
- ``reply-timeout``: how long a round waits for its replies (s, default 600); a site silent for
  that long is left out of the round. ``poll-interval``: seconds between reply polls (default 0.25).

Messages: ``query`` (which site a node serves), ``train``, ``evaluate`` and, at the end,
``query.publish``: a site answers it with its val-selected personalised model only when its node
config opts in (``publish-personal='true'``), and draws its overlays on its own machine. A site that
raises, disconnects or stays silent is left out of that phase and named, with the reason, in the log
and in ``RUN/run.log``.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from iopfl.config import CONFIG_DIR, Config, load_config
from iopfl.engine.federation import Federation
from iopfl.engine.flower import wire
from iopfl.engine.flower.errors import ending_the_run, log_user_errors_in_one_line
from iopfl.engine.flower.nodes import Messenger, NodeDirectory
from iopfl.engine.rundir import RunDir, RunLog
from iopfl.engine.transport import EvalReply, Reply, Roster
from iopfl.errors import UserError
from iopfl.fl import STRATEGIES, ClientReply, build_strategy
from iopfl.models import StateDict
from iopfl.results import PERSONALIZED

app = ServerApp()
APP_DIR = Path(__file__).resolve().parent / "app"  # the Flower app folder given to `flwr run`
# the run-config keys and their defaults, written once: in the app's pyproject.toml
DEFAULTS: dict[str, Any] = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
log = logging.getLogger("flwr")  # Flower's logger: shown by `flwr run --stream` and in `flwr log`
log_user_errors_in_one_line()
PUBLISH = f"{MessageType.QUERY}.publish"


@dataclass
class Settings:
    """The ServerApp's run config (defaults: the app's pyproject.toml)."""

    config: Path
    run_dir: Path
    overrides: list[str]
    nodes: int = int(DEFAULTS["nodes"])
    join_timeout: float = float(DEFAULTS["join-timeout"])
    reply_timeout: float = float(DEFAULTS["reply-timeout"])
    poll_interval: float = float(DEFAULTS["poll-interval"])

    @classmethod
    def from_run_config(cls, given: dict[str, Any]) -> Settings:
        rc = {**DEFAULTS, **given}
        if not str(rc["run-dir"]).strip():
            raise UserError("run config needs run-dir='<run directory>'")
        config = str(rc["config"]).strip()
        raw = str(rc["overrides"]).strip()
        # absolute at once: a relative path means the SuperLink's working directory, which the user
        # of `flwr run` may not know; every message then names the file that was really looked for
        return cls(
            Path(config).expanduser().absolute() if config else CONFIG_DIR / "demo.yaml",
            Path(str(rc["run-dir"])).expanduser().absolute(),
            [x.strip() for x in raw.split(";") if x.strip()],
            nodes=int(rc["nodes"]),
            join_timeout=float(rc["join-timeout"]),
            reply_timeout=float(rc["reply-timeout"]),
            poll_interval=float(rc["poll-interval"]),
        )


class FlowerSites:
    """The sites of a Flower grid: each phase is one message per site and the replies that come back."""

    engine = "flower"

    def __init__(self, cfg: Config, settings: Settings, grid: Grid, runlog: RunLog):
        self.cfg, self.settings, self.log = cfg, settings, runlog
        self.strategy = build_strategy(cfg.fl.method, cfg.fl.strategy_params())
        self.messenger = Messenger(
            grid, json.dumps(cfg.model_dump(mode="json")), settings.reply_timeout, settings.poll_interval
        )
        self.directory = NodeDirectory(grid, cfg, self.messenger, runlog.note, runlog.info)
        self.sites: list[str] = []

    def connect(self, run_key: str, known_sites: list[str] | None) -> Roster:
        self.messenger.run_key = run_key
        self.sites = self.directory.discover(known_sites, self.settings.nodes, self.settings.join_timeout)
        network = self.directory.network
        # discover raises unless fl.min_clients (>= 1) sites joined, and each one joining sets the network
        assert network is not None
        return Roster(self.sites, self.sites, network, self.directory.devices)

    def _send(
        self, kind: str, sites: list[str], round_: int, weights: StateDict, **extra: Any
    ) -> dict[str, Message | str]:
        """One message per site; by site, its reply or why there is none."""
        start = time.monotonic()
        nodes = self.directory.nodes
        out: dict[str, Message | str] = {s: "no SuperNode online" for s in sites if s not in nodes}
        targets = {s: nodes[s] for s in sites if s in nodes}
        messages = {
            s: self.messenger.message(kind, node, round_, weights, **extra.get(s, {})) for s, node in targets.items()
        }
        replies = self.messenger.exchange(messages)
        for site in targets:
            reply = replies.get(site)
            if reply is None:
                out[site] = f"no {kind} reply within {self.messenger.reply_timeout:g} s"
            elif reply.has_error():
                out[site] = f"it failed: {reply.error.reason} (Flower error code {reply.error.code})"
            else:
                out[site] = reply
        good = sum(not isinstance(r, str) for r in out.values())
        self.log.info(f"round {round_} {kind}: {good}/{len(targets)} sites replied in {time.monotonic() - start:.1f} s")
        return out

    def fit(self, round_: int, names: list[str], weights: StateDict) -> Iterator[tuple[str, Reply]]:
        if round_ > 1:
            self.directory.refresh(self.sites)
        replies = self._send(MessageType.TRAIN, names, round_, weights)
        for site in names:
            reply = replies[site]
            if isinstance(reply, str):
                yield site, reply
                continue
            reply_site, sent, n, metrics = wire.read_train_reply(reply.content)
            yield (
                site,
                (
                    ClientReply(sent, n, metrics)
                    if reply_site == site
                    else f"node {self.directory.nodes.get(site)} answered for {reply_site}"
                ),
            )

    def evaluate(self, round_: int, sites: list[str], weights: StateDict) -> dict[str, EvalReply | str]:
        replies = self._send(MessageType.EVALUATE, sites, round_, weights)
        out: dict[str, EvalReply | str] = {}
        for site, reply in replies.items():
            info = reply if isinstance(reply, str) else wire.read_info(reply.content)
            out[site] = info if isinstance(info, str) else EvalReply(info["scores"], info["best"])
        return out

    def publish(self, selected_global: StateDict, overlay_sites: list[str]) -> dict[str, StateDict | None]:
        """The last message of a run: sites that opted in send their val-selected personalised model."""
        extra = {s: {"overlay": s in overlay_sites} for s in self.sites}
        replies = self._send(PUBLISH, self.sites, self.cfg.fl.rounds, selected_global, **extra)
        out: dict[str, StateDict | None] = {}
        for site, reply in replies.items():
            out[site] = None if isinstance(reply, str) else wire.read_publish_reply(reply.content)
            if isinstance(reply, str):
                self.log.note(f"site {site} could not be asked to publish: {reply}")
            elif out[site] is None and PERSONALIZED in self.strategy.models:
                self.log.info(f"site {site} did not opt in to publish its personalised model")
        return out

    def state(self) -> tuple[dict, dict]:
        return {}, {}  # the sites keep their own state, on their machines

    def load_state(self, tensors: dict, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def flower_run(cfg: Config, settings: Settings, grid: Grid) -> Federation:
    """The federation core over this grid's SuperNodes, writing ``settings.run_dir``."""
    if STRATEGIES[cfg.fl.method].pooled:
        raise UserError(
            f"fl.method={cfg.fl.method} pools every site's data in one place: not a "
            "federated method, so it has no Flower deployment (use `iopfl train`)"
        )
    runlog = RunLog(RunDir(settings.run_dir), log)
    return Federation(cfg, settings.run_dir, FlowerSites(cfg, settings, grid, runlog), runlog=runlog)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The entry point of the coordinator: a user's mistake ends the run as failed, in one line."""
    with ending_the_run():
        settings = Settings.from_run_config(dict(context.run_config))
        log.info("iopfl: config %s, run directory %s", settings.config, settings.run_dir)
        cfg = load_config(settings.config, settings.overrides)
        flower_run(cfg, settings, grid).run(resume=True)  # a restarted server continues its run
