"""Start and stop Flower processes for iopfl on this machine, and run the iopfl app on them (the tests'
deployments): a SuperLink, one SuperNode per site, ``flwr run`` of the app folder. For several
machines run the same commands on each host (docs/deployment.md). It drives Flower's
command-line tools: every process's environment, ``$FLWR_HOME/config.toml``, arguments, and what
``flwr run`` reports.

Every process gets ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and a ``FLWR_HOME`` we
own; the SuperLink never installs dependencies at run time; everything binds to 127.0.0.1; processes
are stopped by PID (their process group), SuperNodes first, then the SuperLink.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from iopfl.engine.flower.server import APP_DIR

BIN = Path(sys.executable).parent
CONNECTION = "iopfl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, no update check, our FLWR_HOME."""
    env = dict(os.environ if base is None else base)
    # the SuperLink and SuperNodes spawn flower-superexec / flwr-serverapp / flwr-clientapp from PATH
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    # SuperExec looks for new tasks every second by default; half of that shortens every phase
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    return env


def write_flwr_home(home: Path, address: str, tls_ca: Path | None = None, name: str = CONNECTION) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default).

    Always write it yourself: without it, ``flwr`` creates a default whose ``local`` connection starts
    a separate simulation SuperLink instead of using your deployment.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{Path(tls_ca).resolve()}"' if tls_ca else "insecure = true"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')
    return path


def run_config_arg(values: Mapping[str, object]) -> str:
    """``--run-config`` text: strings quoted (TOML), numbers as they are."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@dataclass
class RunOutcome:
    """What ``flwr run`` did: the run id, Flower's final status of the run, and the streamed log."""

    run_id: str | None
    status: str  # e.g. "finished:completed", "finished:failed" (``flwr ls``)
    output: str

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, all started by us and stopped by PID.

    ``certs``: a folder from ``scripts/make_certs.sh`` (ca.crt, server.pem, server.key) for TLS;
    ``auth``: SuperNode authentication (needs TLS; each SuperNode's public key is registered with
    ``flwr supernode register`` before it starts); ``simulation``: a SuperLink with Flower's simulation
    runtime (no SuperNodes: ``run(..., supernodes=N)``).
    """

    home: Path
    certs: Path | None = None
    auth: bool = False
    simulation: bool = False
    database: Path | None = None  # the SuperLink's state file (default: in memory, which is faster)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path | None:
        return self.certs / "ca.crt" if self.certs else None

    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.home / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log
        with log.open("a") as out:
            proc = subprocess.Popen(
                args,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    # --- SuperLink -----------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.database:
            args += ["--database", str(self.database)]
        if self.certs:
            args += [
                "--ssl-ca-certfile",
                str(self.ca),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
            ]
        else:
            args += ["--insecure"]
        if self.auth:
            if not self.certs:
                raise ValueError("SuperNode authentication needs TLS certificates")
            args += ["--enable-supernode-auth"]
        if self.simulation:
            args += ["--simulation"]
        self._spawn("superlink", args)
        write_flwr_home(self.home, self.address, self.ca)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        scheme = "https" if self.certs else "http"
        context = ssl.create_default_context(cafile=str(self.ca)) if self.certs else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited; see {self.logs['superlink']}:\n{self.log_text('superlink')[-2000:]}"
                )
            try:
                urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"SuperLink not ready on {self.address}; see {self.logs['superlink']}")

    # --- SuperNodes ----------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this deployment (the ``iopfl`` connection)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def register_supernode_key(self, public_key: Path) -> None:
        """Allow the SuperNode holding the matching private key (``flwr supernode register``)."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if done.returncode != 0 or "registered successfully" not in done.stdout:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{done.stdout}\n{done.stderr}")

    def add_supernode(
        self,
        site: str,
        data_root: Path | None = None,
        auth_key: Path | None = None,
        max_retries: int = 30,
        **node_config: object,
    ) -> None:
        """A SuperNode serving ``site`` (node config ``site``, ``data-root``, ``state-dir`` + extras);
        ``auth_key``: its private key when the SuperLink authenticates SuperNodes."""
        config = {
            "site": site,
            **({"data-root": str(data_root)} if data_root else {}),
            "state-dir": str(self.home / "site-state" / site),
            **node_config,
        }
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            self.address,
            "--node-config",
            run_config_arg(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--max-retries",
            str(max_retries),
        ]
        args += ["--root-certificates", str(self.ca)] if self.certs else ["--insecure"]
        if auth_key:
            args += ["--auth-supernode-private-key", str(auth_key)]
        self._spawn(f"supernode-{site}", args)

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` SuperNodes are registered (``flwr supernode ls``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
            try:
                nodes = json.loads(done.stdout).get("nodes", [])
            except json.JSONDecodeError:
                nodes = []
            if sum(1 for n in nodes if str(n.get("status", "")).lower() == "online") >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} SuperNodes online after {timeout:g} s:\n{self.log_text()[-3000:]}")

    def stop_processes(self, names: Iterable[str], grace: float = 15) -> None:
        """SIGTERM to each named process group (started by us), then wait; SIGKILL after ``grace`` s."""
        procs = [p for p in (self.procs.pop(n, None) for n in list(names)) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # children the leader left behind (flwr-clientapp, ...)

    def stop_process(self, name: str, grace: float = 15) -> None:
        self.stop_processes([name], grace)

    def stop_supernode(self, site: str) -> None:
        self.stop_process(f"supernode-{site}")

    # --- runs ----------------------------------------------------------------------------------
    def run(
        self,
        config: Path,
        run_dir: Path,
        overrides: Iterable[str] = (),
        nodes: int = 0,
        supernodes: int | None = None,
        timeout: float = 900,
        app: Path = APP_DIR,
        **run_config: object,
    ) -> RunOutcome:
        """``flwr run`` the iopfl app (or another app folder, ``app``) and wait for it; the outcome
        carries Flower's final run status.

        ``supernodes``: the simulation's number of virtual SuperNodes (simulation runtime only).
        Extra keyword arguments become run-config keys (``reply_timeout=60`` → ``reply-timeout=60``).
        """
        rc = {
            "config": str(Path(config).resolve()),
            "run-dir": str(Path(run_dir).resolve()),
            "overrides": ";".join(overrides),
            "nodes": nodes,
            **{k.replace("_", "-"): v for k, v in run_config.items()},
        }
        args = ["run", str(app), CONNECTION, "--stream", "--run-config", run_config_arg(rc)]
        if supernodes is not None:
            args += ["--federation-config", f"num-supernodes={supernodes}"]
        done = self.flwr(*args, timeout=timeout)
        output = strip_ansi(done.stdout + done.stderr)
        found = re.search(r"Successfully started run (\d+)", output)
        run_id = found.group(1) if found else None
        return RunOutcome(run_id, self.run_status(run_id) if run_id else "not started", output)

    def run_status(self, run_id: str, timeout: float = 30) -> str:
        """Flower's status of a run (``flwr ls --run-id``), once it has finished (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            done = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
            try:
                runs = json.loads(done.stdout).get("runs", [])
                status = str(runs[0]["status"]) if runs else status
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
            if status.startswith("finished"):
                break
            time.sleep(0.5)
        return status

    def start(
        self,
        sites: Iterable[str],
        data_root: Path | None = None,
        auth_keys: Mapping[str, Path] | None = None,
        **node_config: object,
    ) -> None:
        """The SuperLink, then one SuperNode per site (its public key registered first when
        ``auth_keys`` maps sites to private keys); returns once every SuperNode is online.
        Stops everything it started if any step fails."""
        sites = list(sites)
        self.auth = self.auth or bool(auth_keys)
        try:
            self.start_superlink()
            for site in sites:
                key = Path(auth_keys[site]) if auth_keys else None
                if key is not None:
                    self.register_supernode_key(Path(f"{key}.pub"))
                self.add_supernode(site, data_root, auth_key=key, **node_config)
            self.wait_for_nodes(len(sites))
        except BaseException:
            self.stop()
            raise

    # --- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """SuperNodes first, then the SuperLink (each with its child processes)."""
        self.stop_processes([n for n in list(self.procs) if n != "superlink"])
        self.stop_processes(["superlink"])

    def log_text(self, name: str | None = None) -> str:
        paths = [self.logs[name]] if name else list(self.logs.values())
        return strip_ansi("\n".join(p.read_text(errors="replace") for p in paths if p.exists()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session: only our processes
    except (ProcessLookupError, PermissionError):
        pass


def start_local_deployment(
    home: Path,
    sites: Iterable[str],
    data_root: Path | None = None,
    certs: Path | None = None,
    auth_keys: Mapping[str, Path] | None = None,
    **node_config: object,
) -> Deployment:
    """A SuperLink and one SuperNode per site on loopback, ready for :meth:`Deployment.run`.

    ``auth_keys``: site → private key file (``make_certs.sh`` writes ``supernode-<i>`` and ``.pub``);
    given, SuperNode authentication is enabled and each public key registered. Stop it with
    ``deployment.stop()`` (or use it as a context manager).
    """
    d = Deployment(Path(home), certs=certs, auth=bool(auth_keys))
    d.start(sites, data_root, auth_keys, **node_config)
    return d
