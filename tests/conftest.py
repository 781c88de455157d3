"""Shared test hygiene."""

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch gets its share of the cores (and so do the processes it
    starts, through OMP_NUM_THREADS): a thread per core in every worker would oversubscribe the CPU.
    Subprocesses inherit the same count, so in-process and subprocess float sums still agree."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Restore torch's thread count after each test: code under test may set ``runtime.threads``
    in-process (the runner, the Flower ClientApp), and float sums depend on the thread count, so a
    later test comparing an in-process run with a subprocess would otherwise see other numbers."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
