"""Shared test hygiene."""

import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Restore torch's thread count after each test: code under test may set ``runtime.threads``
    in-process (the runner, the Flower ClientApp), and float sums depend on the thread count, so a
    later test comparing an in-process run with a subprocess would otherwise see other numbers."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
