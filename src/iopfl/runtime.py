"""Where and how tensors are computed (the ``runtime.`` config section): device, precision, memory
format, threads, determinism, compilation and parallel sites.

One place decides these for every engine and command: each entry point (``iopfl train``, ``adapt``,
``predict``, each Flower app, each worker process) resolves one :class:`Runtime` on its machine, applies
it, and hands it to everything below; the manifest records what was resolved.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from iopfl.errors import UserError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check_device(value: str) -> str:
    head, _, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got '{value}'")
    return value


class RuntimeConfig(BaseModel):
    """Where and how tensors are computed, for every command and both engines."""

    model_config = ConfigDict(extra="forbid")
    device: str = Field(
        "auto",
        description="auto (CUDA if available, else CPU) | cpu | cuda | cuda:N; a device "
        "that is not there is an error naming the key",
    )
    devices: list[str] | None = Field(None, description="workers are spread over these round-robin")
    precision: Precision = Field(
        "fp32",
        description="autocast of the forward (fp16 trains with a gradient scaler); "
        "auto: bf16 where the device has bf16 kernels (CUDA Ampere+, AVX-512/AMX CPUs), "
        "else fp32",
    )
    channels_last: bool = Field(False, description="channels-last memory format for local training")
    threads: int | None = Field(
        None,
        gt=0,
        description="torch threads per process (default: torch's own with one worker, cores / workers otherwise)",
    )
    deterministic: bool = Field(True, description="deterministic kernels: exact resume on every device")
    compile: bool = Field(False, description="torch.compile the training and evaluation forward")
    workers: int = Field(1, ge=1, description="in-process: the sites of a round in N worker processes")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_device(v) for v in value]

    def threads_per_process(self) -> int | None:
        """torch threads for each process: ``threads``, else the cores shared among the workers
        (None with one worker: torch's own default is kept)."""
        if self.threads or self.workers == 1:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)


def resolve_device(requested: str, key: str = "runtime.device") -> torch.device:
    """The device ``requested`` names on this machine; one that is not here is a UserError naming ``key``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"{key}: '{requested}' asked for, but this machine has no usable CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"{key}: '{requested}' asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the device computes it natively, else fp32.

    CUDA: devices that support bf16 (Ampere and later). CPU: AVX-512 or AMX capability; without it
    oneDNN emulates bf16 convolutions, 8.7× slower than fp32 for the demo U-Net on an AVX2-only EPYC
    (docs/results.md, "Speed"), so ``auto`` must not pick it there.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) else "fp32"


@contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass (losses and optimizer steps stay fp32)."""
    with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision in AUTOCAST):
        yield


@dataclass(frozen=True)
class Runtime:
    """The ``runtime`` section resolved on this machine: where and how this process computes."""

    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    channels_last: bool = False
    threads: int | None = None  # torch threads of this process (None: torch's own default)
    deterministic: bool = True
    compile: bool = False

    @classmethod
    def resolve(cls, config: RuntimeConfig, device: str | None = None, key: str = "") -> Runtime:
        """``config`` on this machine; ``device`` (named by ``key`` in errors) replaces ``config.device``
        when given (a node's own hardware, ``--device``, a worker's entry of ``runtime.devices``)."""
        where = resolve_device(config.device) if device is None else resolve_device(device, key)
        return cls(
            where,
            resolve_precision(config.precision, where),
            config.channels_last,
            config.threads_per_process(),
            config.deterministic,
            config.compile,
        )

    def apply(self) -> None:
        """Process-wide settings: threads, and deterministic (or fastest) kernels."""
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace, set before its first use
            if self.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = self.deterministic
            torch.backends.cudnn.benchmark = not self.deterministic
            torch.backends.cuda.matmul.allow_tf32 = not self.deterministic
            torch.backends.cudnn.allow_tf32 = not self.deterministic

    def in_fp32(self) -> Runtime:
        """The same runtime computing in fp32 (test-time adaptation has no mixed precision)."""
        return replace(self, precision="fp32")

    def describe(self) -> dict[str, Any]:
        """What the manifest records about where a run computed."""
        info: dict[str, Any] = {
            "device": str(self.device),
            "precision": self.precision,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        else:
            info["device_name"] = platform.processor() or platform.machine()
        return info
