"""IDX files, the format of MNIST and Fashion-MNIST: a validating reader and a writer (plain or ``.gz``)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rhovae.errors import RhovaeError
from rhovae.files import require_regular_file

__all__ = ["IDX_FILES", "find_idx", "read_idx", "write_idx"]

# the four files of an MNIST-style dataset, by role
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


# more data than any IDX file holds: a header asking for it is damaged (and math on it would overflow)
_MAX_IDX_BYTES = 2**48


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``), validating its magic number, dimensions and length.

    Memory is bounded by the file's real content, not by what its header claims: a plain file's size
    is checked against the header before any data is read, and a ``.gz`` whose header claims more than
    256 MiB is first decompressed without keeping anything, to count what it really holds (a smaller
    claim is allocated as it is). The data is then read once into one
    buffer of exactly its size. A header that the content does not match, or data larger than this
    machine's memory, is one :class:`RhovaeError` naming the file, before anything large is allocated.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        require_regular_file(path, "an IDX file")
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            dtype, dims, expected = _read_header(path, f)
            if gz and expected > _COUNT_FIRST_BYTES:
                _check_length(path, dims, expected, _count(f, expected + 1))
                f.seek(0)  # a gzip stream rewinds by decompressing again from the start
                _read_header(path, f)
            elif not gz:
                _check_length(path, dims, expected, os.fstat(f.fileno()).st_size - f.tell())
            _check_memory(path, dims, expected)
            return _read_data(path, f, dtype, dims, expected)
    except FileNotFoundError:
        raise RhovaeError(f"{path}: no such IDX file") from None
    except IsADirectoryError:
        raise RhovaeError(f"{path}: is a folder, not an IDX file") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise RhovaeError(
            f"{path}: cannot read ({_reason(e)}); the download may be incomplete, fetch it again"
        ) from None


# a .gz whose header claims more than this is decompressed once without keeping anything, to count
_COUNT_FIRST_BYTES = 2**28


def _shown(dims: tuple[int, ...]) -> str:
    return str(dims) if len(dims) <= 6 else f"({', '.join(map(str, dims[:4]))}, ...; {len(dims)} in all)"


def _check_length(path: Path, dims: tuple[int, ...], expected: int, found: int) -> None:
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        shown = found if found < expected else f"more than {expected}"
        raise RhovaeError(
            f"{path}: IDX file {what}: dimensions {_shown(dims)} need {expected} data bytes, found {shown}"
        )


def _check_memory(path: Path, dims: tuple[int, ...], expected: int) -> None:
    total = _physical_memory()
    if total and expected > total:
        raise RhovaeError(
            f"{path}: IDX dimensions {_shown(dims)} hold {expected / 2**30:.1f} GiB, more than this "
            f"machine's {total / 2**30:.1f} GiB of memory; store the data as a .npy (memory-mapped) instead"
        )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _count(f: BinaryIO, limit: int, chunk: int = 2**24) -> int:
    """How many bytes ``f`` still holds, up to ``limit``, keeping none of them."""
    size = 0
    while size < limit:
        part = f.read(min(chunk, limit - size))
        if not part:
            break
        size += len(part)
    return size


def _read_data(path: Path, f: BinaryIO, dtype: np.dtype, dims: tuple[int, ...], expected: int) -> np.ndarray:
    buffer = np.empty(expected, dtype=np.uint8)  # the one allocation: exactly the data's size
    view, size = memoryview(buffer), 0
    while size < expected:
        n = f.readinto(view[size : size + min(2**24, expected - size)])
        if not n:
            break
        size += n
    trailing = f.read(1) if size == expected else b""
    _check_length(path, dims, expected, size + len(trailing))
    try:
        array = buffer.view(dtype).reshape(dims)
    except ValueError as e:  # e.g. more dimensions than NumPy allows
        raise RhovaeError(
            f"{path}: IDX dimensions {_shown(dims)} cannot be an array ({_reason(e)})"
        ) from None
    return array.astype(dtype.newbyteorder("="), copy=not dtype.isnative)


def _reason(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_header(path: Path, f: BinaryIO) -> tuple[np.dtype, tuple[int, ...], int]:
    """The element type, dimensions and data length (bytes) an IDX header announces."""
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise RhovaeError(f"{path}: not an IDX file (bad magic number {magic.hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
    if ndim == 0:
        raise RhovaeError(f"{path}: IDX header with 0 dimensions; the file is damaged")
    head = f.read(4 * ndim)
    if len(head) < 4 * ndim:
        raise RhovaeError(f"{path}: truncated IDX header ({4 + len(head)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(head[4 * i : 4 * i + 4], "big") for i in range(ndim))
    expected = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
    if expected > _MAX_IDX_BYTES:
        raise RhovaeError(
            f"{path}: IDX dimensions {_shown(dims)} describe {expected:.3g} bytes, more than any file holds; "
            "the header is damaged"
        )
    return dtype, dims, expected


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    base = array.dtype.newbyteorder("=")
    if base not in codes:
        raise RhovaeError(
            f"cannot write dtype {array.dtype} as IDX; use uint8, int8, int16, int32, float32/64"
        )
    if not 1 <= array.ndim <= 255 or any(n >= 2**32 for n in array.shape):
        raise RhovaeError(f"cannot write shape {array.shape} as IDX: 1 to 255 dimensions, each below 2**32")
    code = codes[base]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    try:
        path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    except OSError as e:
        raise RhovaeError(f"cannot write {path}: {_reason(e)}") from None


def find_idx(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever is a file; None when neither is."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None
