"""Data that ships with packages or is generated: nothing is downloaded at run time.

* :func:`digits`: scikit-learn's 8x8 handwritten digits (1,797 images; Alpaydin and Kaynak 1998),
  as grey levels in [0, 1] or binarized;
* :func:`two_moons`, :func:`swiss_roll`: seeded 2-D point clouds from scikit-learn's generators;
* :func:`gapped_sine`: a seeded 1-D regression set, ``sin`` plus noise on separated intervals;
* :func:`split`: a seeded train/test split;
* :func:`load_mnist`: MNIST (LeCun et al. 1998) from the standard IDX files in a folder the user
  names, for the ``full`` profile on a GPU. It never downloads.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["digits", "two_moons", "swiss_roll", "gapped_sine", "split", "read_idx", "load_mnist",
           "MNIST_FILES"]


def _random_state(generator: torch.Generator | None) -> int:
    """An int seed for scikit-learn, drawn from ``generator`` (or torch's global generator)."""
    device = generator.device if generator is not None else None
    return int(torch.randint(0, 2**31 - 1, (), generator=generator, device=device))


def digits(*, binarized: bool = False, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: images ``(1797, 64)`` in ``[0, 1]`` (pixel / 16) and labels ``(1797,)``.

    ``binarized=True`` thresholds at 0.5, giving {0, 1} pixels for a Bernoulli decoder.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=dtype)
    if binarized:
        x = (x > 0.5).to(dtype)
    return x, torch.as_tensor(bunch.target, dtype=torch.long)


def two_moons(n: int, *, noise: float = 0.08, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points of scikit-learn's two interleaving half circles, standardized: ``(n, 2)``."""
    from sklearn.datasets import make_moons

    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    x, _ = make_moons(n_samples=n, noise=noise, random_state=_random_state(generator))
    return _standardize(torch.as_tensor(x, dtype=dtype))


def swiss_roll(n: int, *, noise: float = 0.3, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points of scikit-learn's swiss roll, its (x, z) plane, standardized: ``(n, 2)``."""
    from sklearn.datasets import make_swiss_roll

    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    x, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=_random_state(generator))
    return _standardize(torch.as_tensor(x[:, [0, 2]], dtype=dtype))


def _standardize(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / x.std(0)


def split(*tensors: Tensor, test_fraction: float = 0.2,
          generator: torch.Generator | None = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """A seeded random split of tensors sharing their first dimension: ``(train, test)`` tuples."""
    if not tensors:
        raise ValueError("split needs at least one tensor")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("tensors must share their first dimension")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    device = generator.device if generator is not None else None  # a CUDA generator works too
    perm = torch.randperm(n, generator=generator, device=device).to(tensors[0].device)
    n_test = max(1, int(round(test_fraction * n)))
    test, train = perm[:n_test], perm[n_test:]
    return tuple(t[train] for t in tensors), tuple(t[test] for t in tensors)


# --------------------------------------------------------------------------- MNIST from IDX files

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as an array.

    Format: two zero bytes, a type byte (0x08 = unsigned byte, ...), the number of dimensions,
    then each dimension as a big-endian int32, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, but the file holds {data.size} values")
    return data.reshape(shape)


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}[.gz] not found in {folder}. Put the four standard IDX files "
        f"({', '.join(f for pair in MNIST_FILES.values() for f in pair)}) there; nothing is downloaded."
    )


def load_mnist(folder: str | os.PathLike, *, split: str = "train", binarized: bool = False,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """MNIST from ``folder``: images ``(N, 784)`` in ``[0, 1]`` (or {0, 1}) and labels ``(N,)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {folder} does not exist")
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(MNIST_FILES)}, got {split!r}")
    image_file, label_file = (_find(folder, name) for name in MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.as_tensor(images.reshape(images.shape[0], -1) / 255.0, dtype=dtype)
    if binarized:
        x = (x > 0.5).to(dtype)
    return x, torch.as_tensor(labels.astype(np.int64))


# --------------------------------------------------------------------------- 1-D regression


def gapped_sine(n: int, *, intervals: tuple[tuple[float, float], ...] = ((-4.0, -1.5), (1.5, 4.0)),
                noise: float = 0.1, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``n`` points ``y = sin(x) + noise * eps`` with ``x`` uniform on disjoint ``intervals``.

    Each point picks an interval with probability proportional to its length, then a uniform
    position in it; the gaps between intervals hold no data (chapter *Bayesian dropout*).
    Returns ``x`` and ``y``, both ``(n, 1)``, sorted by ``x``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not intervals or any(len(iv) != 2 or not iv[0] < iv[1] for iv in intervals):
        raise ValueError(f"intervals must be non-empty (low, high) pairs with low < high, got {intervals}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    bounds = torch.tensor(intervals, dtype=torch.float64)  # (I, 2)
    lengths = bounds[:, 1] - bounds[:, 0]
    which = torch.multinomial(lengths / lengths.sum(), n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    x = (bounds[which, 0] + u * lengths[which]).sort().values
    y = torch.sin(x) + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    return x.to(dtype).unsqueeze(1), y.to(dtype).unsqueeze(1)
