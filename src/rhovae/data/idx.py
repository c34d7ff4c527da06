"""IDX files, the format of MNIST and Fashion-MNIST: a validating reader and a writer (plain or ``.gz``)."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rhovae.errors import RhovaeError

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

    Reads no more than the header announces (plus one byte, to notice trailing data), so a damaged
    header or a decompression bomb cannot make it read without bound. Every problem is one
    :class:`RhovaeError` naming the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            return _read_idx(path, f)
    except FileNotFoundError:
        raise RhovaeError(f"{path}: no such IDX file") from None
    except IsADirectoryError:
        raise RhovaeError(f"{path}: is a folder, not an IDX file") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise RhovaeError(
            f"{path}: cannot read ({_reason(e)}); the download may be incomplete, fetch it again"
        ) from None


def _reason(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_at_most(f: BinaryIO, n: int, chunk: int = 2**24) -> bytes:
    """Up to ``n`` bytes of ``f``, read in chunks: ``f.read(n)`` would allocate ``n`` bytes up front."""
    parts, size = [], 0
    while size < n:
        part = f.read(min(chunk, n - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _read_idx(path: Path, f: BinaryIO) -> np.ndarray:
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
    shown = str(dims) if ndim <= 6 else f"({', '.join(map(str, dims[:4]))}, ...; {ndim} in all)"
    expected = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
    if expected > _MAX_IDX_BYTES:
        raise RhovaeError(
            f"{path}: IDX dimensions {shown} describe {expected:.3g} bytes, more than any file holds; "
            "the header is damaged"
        )
    data = _read_at_most(f, expected + 1)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        found = len(data) if len(data) < expected else f"more than {expected}"
        raise RhovaeError(
            f"{path}: IDX file {what}: dimensions {shown} need {expected} data bytes, found {found}"
        )
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(dims)
    except ValueError as e:  # e.g. more dimensions than NumPy allows
        raise RhovaeError(f"{path}: IDX dimensions {shown} cannot be an array ({_reason(e)})") from None
    return array.astype(dtype.newbyteorder("="))


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
