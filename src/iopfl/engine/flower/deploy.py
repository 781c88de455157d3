"""Start and stop a Flower deployment on this machine (loopback): a SuperLink, one SuperNode per site,
and ``flwr run`` of the iopfl app. Used by the tests and by ``scripts/flower_local.py``; for several
machines run the same commands on each host (README, "Several machines").

Every process gets ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and a ``FLWR_HOME`` we
own; the SuperLink never installs dependencies at run time; processes are stopped by PID, SuperNodes
first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp from PATH
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=str(home),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    return env


def write_connection(home: Path, name: str, address: str, ca_cert: Path | None = None) -> None:
    """``$FLWR_HOME/config.toml`` naming the deployment, so ``flwr`` never falls back to a simulation."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca_cert}"' if ca_cert else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n'
                                      f'[superlink.{name}]\naddress = "{address}"\n{security}\n')


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, all started by us and stopped by PID."""

    home: Path
    certs: Path | None = None          # folder with ca.crt, server.pem, server.key (scripts/make_certs.sh)
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(args, env=flower_env(self.home), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                cwd=self.home, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--database", str(self.home / "state.db")]
        args += self._tls_server_args()
        self._spawn("superlink", args)
        write_connection(self.home, "iopfl-local", self.address, self.certs / "ca.crt" if self.certs else None)
        self._wait_ready()

    def _tls_server_args(self) -> list[str]:
        if not self.certs:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key")]

    def _wait_ready(self, timeout: float = 60) -> None:
        scheme = "https" if self.certs else "http"
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                ctx = None
                if self.certs:
                    import ssl

                    ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
                urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=ctx)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"SuperLink not ready on {self.address}; see {self.logs[0]}")

    def add_supernode(self, site: str, data_root: Path | None, **extra: object) -> None:
        config = {"site": site, **({"data-root": str(data_root)} if data_root else {}),
                  "state-dir": str(self.home / "client-state" / site), **extra}
        node_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in config.items())
        args = [str(BIN / "flower-supernode"), "--superlink", self.address, "--node-config", node_config,
                "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "30"]
        args += ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]
        self._spawn(f"supernode-{site}", args)

    def run(self, config: Path, run_dir: Path, nodes: int, overrides: list[str] = (), timeout: float = 600) -> str:
        """``flwr run`` the iopfl app; returns its output. Raises if the run did not finish."""
        rc = {"config": str(config), "run-dir": str(run_dir), "overrides": ";".join(overrides), "nodes": nodes}
        run_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in rc.items())
        done = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "iopfl-local", "--stream",
                               "--run-config", run_config], env=flower_env(self.home), cwd=self.home,
                              capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        if not (Path(run_dir) / "results.json").exists():
            raise RuntimeError(f"flwr run did not produce results (exit {done.returncode}):\n{output[-3000:]}")
        return output

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink: SIGTERM, then SIGKILL after a grace period."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_text(deployment: Deployment) -> str:
    return "\n".join(p.read_text(errors="replace") for p in deployment.logs if p.exists())


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
