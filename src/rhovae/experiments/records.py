"""A run's evaluation record (``evaluation.json``): reading it, and whether it is of a grid point's
settings (so a finished run is not redone, and a record of other settings is not reported)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rhovae.config import RunConfig, from_dict
from rhovae.errors import RhovaeError
from rhovae.files import require_regular_file

log = logging.getLogger(__name__)


def _evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``evaluation.json``; None when there is none. A damaged one is a RhovaeError."""
    path = run_dir / "evaluation.json"
    try:
        require_regular_file(path, "an evaluation record")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise RhovaeError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise RhovaeError(
            f"{path}: not complete JSON (truncated?); the run will be evaluated again"
        ) from None
    if not isinstance(record, dict):
        raise RhovaeError(f"{path}: not an evaluation record; the run will be evaluated again")
    return record


# settings that change where a run computes or what it draws, not its numbers
_PLACEMENT = ("device", "pictures")


def _matches(record: dict[str, Any], cfg: RunConfig, iwae_k: int, iwae_limit: int) -> bool:
    """Whether an evaluation record is of these settings: the run's config (but where it ran), k, and the
    requested number of test images (recorded by :func:`run_one`; older records only have the number
    evaluated)."""
    limit_ok = (
        record.get("iwae_limit") == iwae_limit
        if "iwae_limit" in record
        else iwae_limit == 0 or record.get("test_images") == iwae_limit
    )
    config = record.get("config")
    if not isinstance(config, dict):
        return False
    try:  # settings added since the record was written take their defaults
        config = from_dict(config).to_dict()
    except RhovaeError:
        return False
    same = {k: v for k, v in config.items() if k not in _PLACEMENT} == {
        k: v for k, v in cfg.to_dict().items() if k not in _PLACEMENT
    }
    return same and record.get("iwae_k") == iwae_k and limit_ok


def _finished(run_dir: Path, cfg: RunConfig, iwae_k: int, iwae_limit: int) -> bool:
    try:
        record = _evaluation(run_dir)
    except RhovaeError as e:
        log.warning("%s", e)
        return False
    return record is not None and _matches(record, cfg, iwae_k, iwae_limit)
