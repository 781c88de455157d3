"""Flower's command-line tools as we run them: every process's environment, ``$FLWR_HOME/config.toml``,
arguments, and what ``flwr run`` reports (no ``flwr`` import)."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_HOME=str(home),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
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
    status: str            # e.g. "finished:completed", "finished:failed" (``flwr ls``)
    output: str

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"
