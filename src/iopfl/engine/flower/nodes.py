"""The coordinator's view of the SuperNodes: sending a message to many nodes and collecting the
replies (:class:`Messenger`), and which SuperNode serves which site (:class:`NodeDirectory`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from iopfl.config import Config
from iopfl.engine.flower import wire
from iopfl.errors import UserError

QUERY_TIMEOUT = 120.0  # s: a query only starts the ClientApp and reads the site's data settings
Note = Callable[[str], None]


class Messenger:
    """Push messages, then pull every ``poll_interval`` s until every reply arrived or the timeout.

    (``Grid.send_and_receive`` sleeps 3 s between pulls; a phase here ends as soon as it can.) Replies
    are matched by message id, so the SuperLink's own error replies for an unreachable node match too.
    """

    def __init__(self, grid: Grid, config_json: str, reply_timeout: float, poll_interval: float):
        self.grid, self.config_json = grid, config_json
        self.reply_timeout, self.poll_interval = reply_timeout, poll_interval
        self.run_key = ""

    def message(self, kind: str, node: int, round_: int, weights=None, **extra: Any) -> Message:
        # the TTL ends when the server stops waiting: a node back later never gets a stale round
        body = wire.instruction(self.config_json, round_, self.run_key, weights, **extra)
        return Message(
            body, dst_node_id=node, message_type=kind, group_id=str(round_), ttl=max(self.reply_timeout, 10.0)
        )

    def exchange(self, messages: dict[Any, Message], timeout: float | None = None) -> dict[Any, Message]:
        if not messages:
            return {}
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        # not strict: a refused push (payload too large) returns no ids at all; its nodes then go unanswered
        key_of = {i: k for k, i in zip(keys, ids, strict=False) if i}
        pending = set(key_of)
        replies: dict[Any, Message] = {}
        deadline = time.monotonic() + (self.reply_timeout if timeout is None else timeout)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                mid = reply.metadata.reply_to_message_id
                if mid in key_of:
                    replies[key_of[mid]] = reply
                    pending.discard(mid)
            if pending:
                time.sleep(self.poll_interval)
        return replies


class NodeDirectory:
    """Which SuperNode serves which site. A node that fails to say, serves the held-out site or a site
    outside the run takes no part; a restarted SuperNode comes back with a new node id and is adopted."""

    def __init__(self, grid: Grid, cfg: Config, messenger: Messenger, note: Note, info: Note):
        self.grid, self.cfg, self.messenger, self.note, self.info = grid, cfg, messenger, note, info
        self.nodes: dict[str, int] = {}  # site -> node id of the SuperNode serving it
        self.ignored: set[int] = set()  # nodes that serve no training site of this run
        self.network: dict[str, Any] | None = None
        self.devices: dict[str, dict[str, Any]] = {}  # site -> where it computes, as it said

    def online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def _query(self, node_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        node_ids = list(node_ids)
        timeout = min(self.messenger.reply_timeout, QUERY_TIMEOUT)
        replies = self.messenger.exchange(
            {n: self.messenger.message(MessageType.QUERY, n, 0) for n in node_ids}, timeout
        )
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
            self.devices[site] = info.get("device", {})
            self.network = self.network or info["network"]
            if info["network"] != self.network:
                raise UserError(
                    f"site {site}: its data needs network {info['network']}, "
                    f"other sites {self.network} (same data settings everywhere?)"
                )

    def discover(self, known_sites: list[str] | None, expected_nodes: int, join_timeout: float) -> list[str]:
        """Wait for the SuperNodes, learn which site each serves; the run's sites in the in-process order."""
        cfg = self.cfg
        wanted = [s for s in (known_sites or cfg.data.sites or []) if s != cfg.data.holdout]
        expected = expected_nodes or len(wanted) or cfg.fl.min_clients
        deadline = time.monotonic() + join_timeout
        online = self.online()
        while len(online) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
            online = self.online()
        if len(online) < expected:
            self.note(
                f"{len(online)} of {expected} expected SuperNodes joined within {join_timeout:g} s; starting with them"
            )
        if not expected_nodes and not wanted:
            self.note(
                f"run config 'nodes' is not set: the run's sites are those of the {len(online)} "
                "SuperNode(s) online now; set nodes=<number of sites> to wait for every site"
            )
        self._adopt(self._query(online), known_sites or cfg.data.sites)
        # the in-process order: the configured sites, else sorted by name (as sites are discovered)
        sites = list(known_sites) if known_sites else (wanted or sorted(self.nodes))
        missing = [s for s in sites if s not in self.nodes]
        if missing:
            self.note(f"no SuperNode serves {', '.join(missing)} yet")
        if len(self.nodes) < cfg.fl.min_clients:
            raise UserError(
                f"only {len(self.nodes)} site(s) joined ({', '.join(self.nodes) or 'none'}); "
                f"fl.min_clients is {cfg.fl.min_clients}"
            )
        self.info(f"sites: {', '.join(f'{s} (node {self.nodes[s]})' for s in sites if s in self.nodes)}")
        return sites

    def refresh(self, sites: list[str]) -> None:
        """Between rounds: adopt SuperNodes that (re)joined, forget those that went offline."""
        online = self.online()
        for site, node in list(self.nodes.items()):
            if node not in online:
                self.note(f"site {site}: its SuperNode (node {node}) is offline")
                del self.nodes[site]
        new = online - set(self.nodes.values()) - self.ignored
        if new:
            self._adopt(self._query(new), sites)
