"""Pillow helpers shared by the ``folder:`` source and :class:`~rhovae.data.Preprocessing`.

One function turns an opened image into the uint8 array a model is trained on (:func:`image_array`), so
an image given to a trained model later goes through exactly the steps its training images went through.
Pillow is imported lazily: array datasets never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rhovae.errors import RhovaeError

__all__ = ["chw_image", "image_array", "image_files", "is_colour", "open_image"]

_GREY_MODES = {"1", "L", "LA", "I", "F"}


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise RhovaeError("image folders and PIL inputs need Pillow: pip install pillow") from None
    return Image


def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, hidden ones skipped) whose suffix Pillow can open, sorted."""
    pil = _pil()
    suffixes = {ext for ext, fmt in pil.registered_extensions().items() if fmt in pil.OPEN}  # not save-only
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def open_image(path: Path) -> Any:
    """The image at ``path`` with its header read (size, mode); pixels are decoded by :func:`image_array`."""
    try:
        return _pil().open(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise RhovaeError(
            f"{path}: cannot read this image ({_one_line(e)}); replace or remove the file"
        ) from None


def is_colour(image: Any) -> bool:
    """True unless the image is grey: a grey mode, or a palette whose every entry is grey."""
    if image.mode in _GREY_MODES or image.mode.startswith("I;"):
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(
            palette[i] != palette[i + 1] or palette[i] != palette[i + 2] for i in range(0, len(palette), 3)
        )
    return True


def image_array(image: Any, channels: int, image_size: int | None = None, name: str = "image") -> np.ndarray:
    """Decode ``image`` into uint8 ``(channels, H, W)``: grey ("L") or RGB, and with ``image_size`` S the
    shorter side resized to S (bilinear, antialiased) and the centre S×S cropped.

    16-bit grey images keep their top 8 bits; alpha is dropped. A truncated or corrupt file raises a
    :class:`RhovaeError` naming ``name``.
    """
    try:
        image.load()
        image = _eight_bit(image).convert("L" if channels == 1 else "RGB")
        if image_size is not None and image.size != (image_size, image_size):
            w, h = image.size
            scale = image_size / min(w, h)
            new = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
            image = image.resize(new, _pil().Resampling.BILINEAR)
            left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
    except (OSError, ValueError, SyntaxError) as e:
        raise RhovaeError(
            f"{name}: cannot read this image ({_one_line(e)}); replace or remove the file"
        ) from None
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def chw_image(array: np.ndarray) -> Any:
    """A PIL image of a uint8 ``(C, H, W)`` array, C in {1, 3}."""
    return _pil().fromarray(array[0] if len(array) == 1 else np.ascontiguousarray(array.transpose(1, 2, 0)))


def _eight_bit(image: Any) -> Any:
    """16-bit and float grey images as 8-bit "L" (Pillow's own conversion would clip, not scale)."""
    if image.mode == "I" or image.mode.startswith("I;"):
        array = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        return _pil().fromarray(array.astype(np.uint8), "L")
    if image.mode == "F":
        return _pil().fromarray(np.asarray(image).clip(0, 255).astype(np.uint8), "L")
    return image


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
