"""The ClientApp: one hospital's side of a Flower deployment.

Node config: ``site`` (the site folder name) and ``data-root`` (overrides ``data.root``), optionally
``state-dir`` (where the personal state is kept between messages and across server restarts; default
``$FLWR_HOME/iopfl-state``). The run's resolved iopfl config arrives with every message, so a client
needs no config file. Each message may run in a fresh process: the dataset comes from iopfl's on-disk
cache and the personal state from the state file, written atomically after every change.
Replies carry only what the strategy sends (shared weights), the sample count and metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from iopfl.config import Config, build_config
from iopfl.data import load_dataset
from iopfl.engine.checkpoint import load_checkpoint, save_checkpoint
from iopfl.engine.flower.wire import content, record_json, record_weights
from iopfl.engine.runner import SiteClient, build_network, make_trainer, network_description
from iopfl.errors import UserError
from iopfl.fl import build_strategy

app = ClientApp()


class Node:
    """The SiteClient of this node, with its personal state loaded from / saved to the state dir."""

    def __init__(self, msg: Message, context: Context):
        info = record_json(msg.content["info"])
        nc = context.node_config
        if "site" not in nc:
            raise UserError("node config: 'site' is required (flower-supernode --node-config \"site='...'\")")
        self.site = str(nc["site"])
        self.info = info
        tree = info["config"]
        if "data-root" in nc:
            tree["data"]["root"] = str(nc["data-root"])
        tree["data"]["sites"] = [self.site]
        self.cfg: Config = build_config(tree, [], origin="config from the server")
        self.spec = load_dataset(self.cfg.data)
        self.build = build_network(self.cfg, self.spec)
        data = self.spec.sites[self.site]
        trainer = make_trainer(self.cfg, self.build, data.train, self.spec.context, self.site)
        self.client = SiteClient(self.site, trainer, data, self.spec, self.build, self.cfg.eval.batch_size)
        self.strategy = build_strategy(self.cfg.fl.method, self.cfg.fl.strategy_config())
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        state_dir = Path(str(nc.get("state-dir", home / "iopfl-state")))
        self.state_file = state_dir / f"{info['run_id']}-{self.site}.safetensors"
        if self.state_file.exists():
            tensors, state = load_checkpoint(self.state_file)
            self.client.load_state(tensors, state["best"])

    def save(self) -> None:
        save_checkpoint(self.state_file, self.client.state_tensors(), {"best": self.client.best.state()})


def _fail_if_asked(context: Context, round_: int) -> None:
    # test hook: ``fail-at-round=N`` in the node config makes this node raise in round N's training
    if int(context.node_config.get("fail-at-round", -1)) == round_:
        raise RuntimeError(f"injected failure at round {round_} (node config fail-at-round)")


@app.query()
def query(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    return Message(content(site=node.site, num_samples=node.client.trainer.num_samples,
                           network=network_description(node.cfg, node.spec)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    round_ = int(node.info["round"])
    _fail_if_asked(context, round_)
    reply = node.client.fit(node.strategy, record_weights(msg.content["weights"]), node.cfg.seed, round_)
    node.save()
    return Message(content(reply.weights, site=node.site, num_samples=reply.num_samples, metrics=reply.metrics),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    round_ = int(node.info["round"])
    scores = node.client.evaluate(node.strategy, record_weights(msg.content["weights"]), node.cfg.seed, round_)
    node.save()
    return Message(content(site=node.site, scores=scores, best=node.client.best.state()), reply_to=msg)
