"""Fixtures shared by the unit tests."""
import pytest

from companion import runtime


@pytest.fixture(autouse=True, scope="session")
def thread_policy():
    """The book's one thread policy (:func:`companion.runtime.threads`) for every test.

    The tests step tiny tensors many times: a second intra-op thread only adds synchronization,
    and on a busy shared CPU each step waits for a core (10-20x slower on a loaded 2-core
    machine). ``COMPANION_THREADS`` overrides it, as in the chapters.
    """
    runtime.use_threads()
    yield
