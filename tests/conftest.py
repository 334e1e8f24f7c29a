"""Fixtures shared by the unit tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that step tiny tensors many times, restored afterwards.

    A second thread only adds synchronization for tiny matrices, and on a busy shared CPU each
    step waits for a core: 10-20x slower was measured on a loaded 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
