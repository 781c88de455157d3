"""The ClientApp: one hospital's side of a Flower deployment.

Node config (``flower-supernode --node-config "site='BIDMC' data-root='/data/SAML'"``):

- ``site``: the site this SuperNode serves (its folder name under the data root). In Flower's
  simulation runtime there is no site key; the node's ``partition-id`` then indexes the run's
  training sites in order (``num-partitions`` must equal their number).
- ``device``: where this site computes (``cpu``, ``cuda``, ``cuda:N``; default: the config's
  ``runtime.device``) — each hospital has its own hardware.
- ``data-root``: this machine's dataset folder (overrides the config's ``data.root``). Every other data
  setting comes from the iopfl config the server sends with each message, so a site needs no file.
- ``state-dir``: where the site keeps its personal state between messages and across server restarts
  (default ``$FLWR_HOME/iopfl-state``); see :mod:`iopfl.engine.flower.state`. Its overlays are drawn
  there too (``<state-dir>/<run-key>-<site>/overlays``): the site's images never leave its machine.
- ``publish-personal``: ``'true'`` to send the site's val-selected personalised model to the
  coordinator at the end of training (outside personalization needs it); default ``'false'``.

Each message runs in a fresh ``flwr-clientapp`` process: the site's data comes from iopfl's on-disk
cache (and a per-process cache where the runtime keeps processes, as the simulation does), the
personal state from the state store. Replies carry only what the strategy sends (``ClientReply.weights``),
the sample count and metrics (:mod:`iopfl.engine.flower.wire`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from iopfl.config import Config, build_config
from iopfl.data import DatasetSpec, load_dataset
from iopfl.engine.flower import wire
from iopfl.engine.flower.errors import log_user_errors_in_one_line
from iopfl.engine.flower.state import EVALUATE, PUBLISH, TRAIN, SiteStateStore
from iopfl.engine.site import make_client, network_description, training_sites
from iopfl.errors import UserError
from iopfl.fl import Strategy, build_strategy
from iopfl.models import StateDict
from iopfl.results import GLOBAL, PERSONALIZED
from iopfl.runtime import Runtime

app = ClientApp()
log_user_errors_in_one_line()  # a user's mistake (e.g. a bad node config) is one line in the SuperNode's log
_SPECS: dict[str, DatasetSpec] = {}  # per-process dataset cache, keyed by the data settings


def _dataset(cfg: Config) -> DatasetSpec:
    key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
    if key not in _SPECS:
        _SPECS.clear()
        _SPECS[key] = load_dataset(cfg.data)
    return _SPECS[key]


def _resolve_site(cfg: Config, node_config: dict) -> str:
    """This node's site: ``site`` from the node config, or the simulation's ``partition-id``."""
    if "site" in node_config:
        return str(node_config["site"])
    if "partition-id" not in node_config:
        raise UserError("node config: 'site' is required (flower-supernode --node-config \"site='...'\")")
    sites = training_sites(cfg, _dataset(cfg))
    pid, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(sites)))
    if parts != len(sites):
        raise UserError(
            f"simulation: {parts} SuperNodes for {len(sites)} training sites ({', '.join(sites)}); "
            f'run with --federation-config "num-supernodes={len(sites)}"'
        )
    return sites[pid]


class SiteNode:
    """The :class:`SiteClient` of this node for one message, restored from / saved to its state store."""

    def __init__(self, msg: Message, context: Context):
        tree, self.round, run_key, self._weights = wire.read_instruction(msg.content)
        nc = context.node_config
        run_cfg = build_config(tree, [], origin="config from the server")
        self.site = _resolve_site(run_cfg, nc)
        self.cfg: Config = run_cfg.for_sites([self.site], str(nc["data-root"]) if "data-root" in nc else None)
        # each hospital computes on its own hardware (node config 'device', else the run's runtime.device)
        self.runtime = Runtime.resolve(
            self.cfg.runtime, str(nc["device"]) if "device" in nc else None, "node config 'device'"
        )
        self.runtime.apply()
        self.spec = _dataset(self.cfg)
        data = self.spec.sites[self.site]
        self.client = make_client(self.cfg, self.runtime, self.spec, self.site, data, data.train)
        self.strategy: Strategy = build_strategy(self.cfg.fl.method, self.cfg.fl.strategy_params())
        self.publishes = _opted_in(nc)
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        state_dir = Path(str(nc.get("state-dir", home / "iopfl-state"))).expanduser()
        self.store = SiteStateStore(state_dir / f"{run_key}-{self.site}")

    @property
    def global_weights(self) -> StateDict:
        """The weights the server sent: every message carries them but the plain ``query``."""
        assert self._weights is not None, "this message carries no weights"
        return self._weights

    def restore(self, phase: int) -> None:
        self.store.check_not_stale(self.round)
        snapshot = self.store.load_before(self.round, phase)
        if snapshot is not None:
            tensors, meta = snapshot
            self.client.load_state(tensors, meta["best"])

    def save(self, phase: int) -> None:
        self.store.save(self.round, phase, self.client.state_tensors(), {"best": self.client.best.state()})


def _opted_in(node_config: dict) -> bool:
    """Node config ``publish-personal``: true or false (TOML bool or string), default false."""
    value = str(node_config.get("publish-personal", "false")).strip().lower()
    if value not in ("true", "false"):
        raise UserError(f"node config 'publish-personal': expected 'true' or 'false', got '{value}'")
    return value == "true"


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which site this node serves, its sample count, and the network the data needs."""
    node = SiteNode(msg, context)
    trainer = node.client.trainer
    assert trainer is not None  # a node trains on its site's cases (make_client is given them)
    body = wire.info_reply(
        node.site,
        **{
            "num-examples": trainer.num_samples,
            "network": network_description(node.cfg, node.spec),
            "device": node.runtime.describe(),
        },
    )
    return Message(body, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The strategy's client half from the sent global weights; personal state stays in the store."""
    node = SiteNode(msg, context)
    node.restore(TRAIN)
    reply = node.client.fit(node.strategy, node.global_weights, node.cfg.seed, node.round)
    node.save(TRAIN)
    return Message(wire.train_reply(node.site, reply.weights, reply.num_samples, reply.metrics), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Scores of the global and the personalised model on val and test; val selection stays here."""
    node = SiteNode(msg, context)
    node.restore(EVALUATE)
    scores = node.client.evaluate(node.strategy, node.global_weights, node.cfg.seed, node.round)
    node.save(EVALUATE)
    return Message(wire.info_reply(node.site, scores=scores, best=node.client.best.state()), reply_to=msg)


@app.query("publish")
def publish(msg: Message, context: Context) -> Message:
    """End of training: draw this site's overlay here, and send the val-selected personalised model
    only if this node opted in (``publish-personal='true'``)."""
    node = SiteNode(msg, context)
    node.restore(PUBLISH)
    client = node.client
    if bool(msg.content["config"]["overlay"]):
        label = PERSONALIZED if PERSONALIZED in node.strategy.models else GLOBAL
        client.draw_overlay(client.selected(node.strategy, node.global_weights), node.store.folder / "overlays", label)
    personal = client.best.weights if node.publishes and PERSONALIZED in node.strategy.models else None
    return Message(wire.publish_reply(node.site, personal or None), reply_to=msg)
