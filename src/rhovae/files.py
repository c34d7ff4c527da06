"""Files rhovae reads and JSON it writes.

What rhovae reads must be a regular file: a FIFO, device or socket where a file belongs would block a
read for ever or feed it without end, so every reader checks first (one line, naming the path). JSON
it writes is strict (no bare NaN), so any reader takes it."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from rhovae.errors import RhovaeError

__all__ = ["is_regular_file", "read_toml_text", "require_regular_file", "strict_json"]


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (following symlinks): False for a FIFO, a device, a socket
    or a folder, which rhovae never reads (a FIFO would block a read for ever)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def require_regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file where rhovae reads one (FileNotFoundError passes through,
    so callers keep their own message for a missing file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise RhovaeError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise RhovaeError(f"{path}: not a regular file (a FIFO, device or socket); give {what} as a file")


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that any JSON reader accepts: a NaN or infinite float becomes ``null`` (Python's
    default writes bare ``NaN``, which is not JSON)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def read_toml_text(path: Path, what: str, missing: str) -> str:
    """The text of the TOML file ``path`` (``what``: "a config", "an experiment"): UTF-8, a byte-order
    mark (as some Windows editors write) dropped. A missing file (``missing`` says what to do), a folder,
    a FIFO, bytes that are not UTF-8 and any other read error are one :class:`RhovaeError` line."""
    try:
        require_regular_file(path, f"{what} TOML file")
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RhovaeError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise RhovaeError(f"{path}: is a folder; give a TOML file") from None
    except UnicodeDecodeError:
        raise RhovaeError(f"{path}: not UTF-8 text; {what} is a TOML file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise RhovaeError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
