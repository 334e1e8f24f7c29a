"""Where the book's code runs and how big it runs: device, threads, seeding, profiles.

Every chapter calls :func:`setup` once at the top (the thread policy, then :func:`seed`) and
takes its sizes from :func:`pick`, so that the ``quick`` profile (the default) runs on a laptop
CPU in seconds and the ``full`` profile runs the same code at paper scale on a GPU::

    COMPANION_PROFILE=full make book

The one thread policy (:func:`threads`): the book's tensors are small, and torch's default of
one intra-op thread per core collapses when another process is busy on the same cores (the
diffusion chapter took 19 s idle and 54 s beside one busy process with torch's default on a
2-core CPU, 23 s either way with one thread). So on a CPU the book uses one thread; on a
machine with CUDA it keeps torch's default; ``COMPANION_THREADS`` overrides both.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator, TypeVar

import numpy as np
import torch

__all__ = ["PROFILES", "device", "threads", "use_threads", "setup", "seed", "profile", "pick", "rng"]

PROFILES = ("quick", "full")
T = TypeVar("T")


def device() -> torch.device:
    """The device chapters compute on: CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def threads() -> int | None:
    """The number of intra-op threads the book runs with: the one thread policy.

    ``COMPANION_THREADS`` if set (a positive int, or ``default`` for torch's own choice);
    else torch's default (``None``) on a machine with CUDA, where the CPU only feeds the GPU;
    else 1: the book's tensors are small, and a second thread costs more than it gives as soon
    as another process wants the same cores (see the table in ``CONTRIBUTING.md``).
    """
    value = os.environ.get("COMPANION_THREADS", "").strip().lower()
    if value == "default":
        return None
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"COMPANION_THREADS must be a positive int or 'default', got {os.environ['COMPANION_THREADS']!r}"
            )
        return int(value)
    return None if torch.cuda.is_available() else 1


_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def use_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n``, or by default to the policy's :func:`threads`.

    Where the policy says torch's default, that is the number torch chose when ``companion``
    was first imported. Returns the thread count now in use.
    """
    if n is None:
        n = threads()
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"use_threads: n must be a positive int or None, got {n!r}")
    torch.set_num_threads(_TORCH_DEFAULT_THREADS if n is None else n)
    return torch.get_num_threads()


def setup(n: int = 0) -> torch.Generator:
    """The first call of every chapter: apply the thread policy, then :func:`seed` ``n``.

    Returns the seeded ``torch.Generator`` on :func:`device`.
    """
    use_threads()
    return seed(n)


def seed(n: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators with ``n``.

    Returns a fresh ``torch.Generator`` on :func:`device` seeded with ``n``, for functions
    that take ``generator=``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"seed: n must be a non-negative int, got {n!r}")
    random.seed(n)
    np.random.seed(n % 2**32)
    torch.manual_seed(n)
    return torch.Generator(device=device()).manual_seed(n)


def profile() -> str:
    """The run profile, read from the environment variable ``COMPANION_PROFILE``.

    ``quick`` (the default) sizes every chapter for a 2-core CPU; ``full`` sizes it for a GPU.
    """
    name = os.environ.get("COMPANION_PROFILE", "quick").strip().lower() or "quick"
    if name not in PROFILES:
        raise ValueError(
            f"COMPANION_PROFILE must be one of {PROFILES}, got {os.environ['COMPANION_PROFILE']!r}"
        )
    return name


def pick(quick: T, full: T) -> T:
    """The value for the current :func:`profile`: ``pick(quick=2_000, full=200_000)``."""
    return quick if profile() == "quick" else full


@contextlib.contextmanager
def rng(generator: torch.Generator | None) -> Iterator[None]:
    """Run the block with torch's global generator seeded from ``generator``.

    ``torch.distributions`` samples only from the global generator. Inside
    ``with rng(g):`` it draws from a stream determined by ``g`` (which advances), and the
    global state is restored afterwards, so ``dist.rsample()`` becomes reproducible without
    touching anyone else's randomness. With ``generator=None`` the block runs unchanged.
    """
    if generator is None:
        yield
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    stream = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        # seed only the generators forked here: torch.manual_seed would also initialise every
        # other backend, which costs ~0.3 ms per call in a loop
        torch.default_generator.manual_seed(stream)
        if devices:
            torch.cuda.manual_seed(stream)
        yield
