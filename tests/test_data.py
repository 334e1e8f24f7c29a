"""companion.data: shipped data, generators, the split, and the MNIST IDX reader."""
import gzip
import math
import struct

import numpy as np
import pytest
import torch

from companion import data


def test_digits_grey_and_binarized():
    x, y = data.digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == 0 and x.max() == 1 and set(y.tolist()) == set(range(10))
    xb, _ = data.digits(binarized=True)
    assert set(xb.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(xb, (x > 0.5).float())


@pytest.mark.parametrize("make", [data.two_moons, data.swiss_roll])
def test_point_clouds_are_seeded_and_standardized(make):
    a = make(500, generator=torch.Generator().manual_seed(0))
    b = make(500, generator=torch.Generator().manual_seed(0))
    c = make(500, generator=torch.Generator().manual_seed(1))
    assert a.shape == (500, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.mean(0), torch.zeros(2), atol=1e-5) and torch.allclose(a.std(0), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="n must"):
        make(1)


def test_split():
    x, y = torch.arange(100.0).reshape(50, 2), torch.arange(50)
    (xtr, ytr), (xte, yte) = data.split(x, y, test_fraction=0.2, generator=torch.Generator().manual_seed(0))
    assert xtr.shape == (40, 2) and xte.shape == (10, 2)
    assert torch.equal(xtr[:, 0] / 2, ytr.float()) and torch.equal(xte[:, 0] / 2, yte.float())
    assert sorted(torch.cat([ytr, yte]).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="test_fraction"):
        data.split(x, test_fraction=1.5)
    with pytest.raises(ValueError, match="first dimension"):
        data.split(x, torch.arange(3))


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    # the IDX layout written by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian sizes, data
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files_it_did_not_write(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = data.load_mnist(tmp_path, split="test")
    assert x.shape == (7, 784) and y.dtype == torch.long
    assert torch.allclose(x, torch.as_tensor(images.reshape(7, -1) / 255.0, dtype=torch.float32))
    assert y.tolist() == labels.tolist()
    xb, _ = data.load_mnist(tmp_path, split="test", binarized=True)
    assert set(xb.unique().tolist()) <= {0.0, 1.0}


def test_load_mnist_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, split="validation")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        data.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((2, 3)))
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(tmp_path / "short")


def test_gapped_sine_is_seeded_and_leaves_the_gaps_empty():
    intervals = ((-4.0, -1.5), (1.5, 4.0))
    x, y = data.gapped_sine(500, intervals=intervals, generator=torch.Generator().manual_seed(0))
    x2, y2 = data.gapped_sine(500, intervals=intervals, generator=torch.Generator().manual_seed(0))
    x3, _ = data.gapped_sine(500, intervals=intervals, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (500, 1) and torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    assert torch.all((x[:, 0].abs() >= 1.5) & (x[:, 0].abs() <= 4.0)) and torch.all(x[1:] >= x[:-1])
    # equal lengths: each interval gets Binomial(500, 1/2) points; 5 standard deviations
    assert abs((x < 0).sum().item() - 250) <= 5 * math.sqrt(500 / 4)
    # the noise: residuals y - sin x have standard deviation 0.1 (default) within 5 standard
    # errors of a sample standard deviation, 0.1 / sqrt(2 n)
    residual = (y - torch.sin(x)).double()
    assert abs(residual.std().item() - 0.1) <= 5 * 0.1 / math.sqrt(2 * 500)
    x0, y0 = data.gapped_sine(20, noise=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(y0, torch.sin(x0))
    with pytest.raises(ValueError, match="n must"):
        data.gapped_sine(0)
    with pytest.raises(ValueError, match="intervals"):
        data.gapped_sine(10, intervals=((1.0, 0.0),))
    with pytest.raises(ValueError, match="noise"):
        data.gapped_sine(10, noise=-1.0)


def test_generators_on_the_compute_device_are_accepted():
    from companion.runtime import device

    g = torch.Generator(device=device()).manual_seed(0)
    assert data.two_moons(10, generator=g).shape == (10, 2)
    (a,), (b,) = data.split(torch.arange(10), generator=torch.Generator(device=device()).manual_seed(0))
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
