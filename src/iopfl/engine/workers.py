"""Parallel sites on one machine (``runtime.workers``): the in-process sites spread over worker
processes, so the independent sites of a round train and evaluate at the same time.

Sites are spread so that the workers' loads (slices to train and score) are as even as a greedy
assignment makes them; each site's data is resident in its worker, which serves its sites with the
in-process transport (:class:`~iopfl.engine.inprocess.InProcessSites`). Weights cross the process
boundary through shared memory (torch's reductions for multiprocessing, named segments). Every site's randomness
already derives from (seed, round, site) and the core aggregates in site order, so the numbers equal
one process's with the same torch thread count per site. The checkpoint is the one-process checkpoint:
a run can resume with another number of workers.

Shutdown: Ctrl-C or an error in a site stops every worker (the error is raised once, naming the
site); a worker whose parent died (even by SIGKILL) exits, by the kernel's parent-death signal on
Linux and otherwise when its pipe to the parent closes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing

from iopfl.config import Config
from iopfl.data import load_dataset
from iopfl.engine.inprocess import InProcessSites
from iopfl.engine.site import network_description, training_sites
from iopfl.engine.transport import EvalReply, Reply, Roster
from iopfl.errors import UserError
from iopfl.fl import build_strategy
from iopfl.models import StateDict
from iopfl.runtime import Runtime

PR_SET_PDEATHSIG = 1
# tensors sent over a pipe travel as named shared-memory segments (torch's reductions): no file
# descriptors to hand over, which would leave the sender waiting on a worker that died
SHARING = "file_system"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe ends the worker instead


def _start(cfg_json: str, sites: list[str], device: str | None, overlay_dir: str) -> InProcessSites:
    """The worker's sites, loaded, on its own runtime (``device``: its entry of ``runtime.devices``)."""
    cfg = Config.model_validate_json(cfg_json).for_sites(sites)
    runtime = Runtime.resolve(cfg.runtime, device, "runtime.devices")
    runtime.apply()
    local = InProcessSites(cfg, runtime, Path(overlay_dir))
    local.connect("", sites)
    return local


def _answer(conn: Connection, call: Callable[[], Any]) -> Any:
    """Run ``call``; a failure goes to the parent, which raises it once (None is returned then)."""
    try:
        return call()
    except UserError as exc:
        conn.send(("user-error", str(exc)))
    except Exception as exc:  # noqa: BLE001 — reported to the parent, which raises it once
        where = traceback.extract_tb(exc.__traceback__)[-1]
        conn.send(("error", f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"))
    return None


def _handle(conn: Connection, local: InProcessSites, op: str, args: tuple) -> None:
    """Answer one call; a fit streams each site's reply as soon as it is done."""
    if op == "fit":
        for name, reply in local.fit(*args):
            conn.send(("reply", (name, reply)))
    conn.send(("done", None if op == "fit" else getattr(local, op)(*args)))


def _serve(conn: Connection, cfg_json: str, sites: list[str], device: str | None, overlay_dir: str) -> None:
    """A worker: load ``sites``, say where they compute, serve them until told to stop or the parent is gone."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.multiprocessing.set_sharing_strategy(SHARING)
    local = _answer(conn, lambda: _start(cfg_json, sites, device, overlay_dir))
    if local is None:
        return
    conn.send(("done", {site: local.runtime.describe() for site in sites}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            return
        _answer(conn, partial(_handle, conn, local, op, args))


def assign(sites: list[str], loads: dict[str, int], workers: int) -> dict[str, int]:
    """site → worker: the heaviest site first, each to the least-loaded worker (ties: the lowest)."""
    totals = [0] * workers
    home = {}
    for site in sorted(sites, key=lambda s: -loads[s]):
        worker = min(range(workers), key=lambda i: (totals[i], i))
        home[site] = worker
        totals[worker] += loads[site]
    return home


class WorkerSites:
    """The in-process sites, spread over ``runtime.workers`` processes (same engine, same checkpoint)."""

    engine = "inprocess"

    def __init__(self, cfg: Config, overlay_dir: Path, workers: int):
        self.cfg, self.overlay_dir, self.workers = cfg, overlay_dir, workers
        self.strategy = build_strategy(cfg.fl.method, cfg.fl.strategy_params())
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.home: dict[str, int] = {}  # site -> index of the worker serving it

    def connect(self, run_key: str, known_sites: list[str] | None) -> Roster:
        spec = load_dataset(self.cfg.data)
        sites = training_sites(self.cfg, spec)
        network = network_description(self.cfg, spec)
        loads = {s: sum(c.num_slices for c in spec.sites[s].all_cases()) for s in sites}
        del spec  # each worker loads only its own sites
        self.home = assign(sites, loads, min(self.workers, len(sites)))
        torch.multiprocessing.set_sharing_strategy(SHARING)
        ctx = multiprocessing.get_context("spawn")
        for i in range(max(self.home.values()) + 1):
            mine = [s for s in sites if self.home[s] == i]
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve,
                args=(child, self.cfg.model_dump_json(), mine, self._device(i), str(self.overlay_dir)),
                name=f"iopfl-worker-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        devices: dict[str, dict[str, Any]] = {}
        for _, _, described in self._collect(range(len(self.conns))):  # each worker, once its sites are loaded
            devices.update(described)
        return Roster(sites, list(sites), network, {s: devices[s] for s in sites})

    def _device(self, worker: int) -> str | None:
        """This worker's entry of ``runtime.devices`` (None: the run's ``runtime.device``)."""
        devices = self.cfg.runtime.devices
        return devices[worker % len(devices)] if devices else None

    def _ask(self, calls: dict[int, tuple[str, tuple]]) -> Iterator[tuple[int, str, Any]]:
        """Send each worker its call; yield (worker, kind, value) as the answers arrive."""
        for i, call in calls.items():
            try:
                self.conns[i].send(call)
            except OSError:  # a worker killed between two calls: its pipe is broken
                raise self._died(i) from None
        yield from self._collect(calls)

    def _collect(self, workers: Iterable[int]) -> Iterator[tuple[int, str, Any]]:
        """(worker, kind, value) as the workers' answers arrive, until each has said it is done."""
        pending = {self.conns[i]: i for i in workers}
        while pending:
            for conn in wait(list(pending)):
                assert isinstance(conn, Connection)  # wait returns some of the objects it is given: our pipes
                i = pending[conn]
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    raise self._died(i) from None
                if kind == "user-error":
                    raise UserError(value)
                if kind == "error":
                    raise UserError(f"worker {i} (sites {', '.join(self._sites_of(i))}) failed: {value}")
                if kind == "done":
                    del pending[conn]
                yield i, kind, value

    def _died(self, worker: int) -> UserError:
        return UserError(f"worker {worker} (sites {', '.join(self._sites_of(worker))}) died; see the messages above")

    def _sites_of(self, worker: int) -> list[str]:
        return [s for s, i in self.home.items() if i == worker]

    def _split(self, names: list[str]) -> dict[int, list[str]]:
        by_worker: dict[int, list[str]] = {}
        for name in names:
            by_worker.setdefault(self.home[name], []).append(name)
        return by_worker

    def fit(self, round_: int, names: list[str], weights: StateDict) -> Iterator[tuple[str, Reply]]:
        calls = {i: ("fit", (round_, mine, weights)) for i, mine in self._split(names).items()}
        for _, kind, value in self._ask(calls):
            if kind == "reply":
                yield value

    def _merged(self, op: str, per_worker: dict[int, tuple]) -> dict:
        merged: dict = {}
        for _, _, value in self._ask({i: (op, args) for i, args in per_worker.items()}):
            merged.update(value)
        return merged

    def evaluate(self, round_: int, sites: list[str], weights: StateDict) -> dict[str, EvalReply | str]:
        return self._merged("evaluate", {i: (round_, mine, weights) for i, mine in self._split(sites).items()})

    def publish(self, selected_global: StateDict, overlay_sites: list[str]) -> dict[str, StateDict | None]:
        return self._merged(
            "publish",
            {i: (selected_global, [s for s in overlay_sites if self.home[s] == i]) for i in range(len(self.conns))},
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {}
        for _, _, (t, s) in self._ask({i: ("state", ()) for i in range(len(self.conns))}):
            tensors.update(t)
            state.update(s)
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Each worker gets its sites' tensors (keys ``personal/<site>/...``, ``best/<site>/...``)."""
        calls = {}
        for i in range(len(self.conns)):
            mine = set(self._sites_of(i))
            own = {k: v for k, v in tensors.items() if k.count("/") >= 2 and k.split("/")[1] in mine}
            calls[i] = ("load_state", (own, {s: state[s] for s in mine}))
        for _ in self._ask(calls):
            pass

    def close(self) -> None:
        """Stop every worker (also after an error or Ctrl-C); none outlives the run."""
        for conn in self.conns:
            try:
                conn.send(("stop", ()))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []
