import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests run many tiny ops: one thread avoids OpenMP spin-waits on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
