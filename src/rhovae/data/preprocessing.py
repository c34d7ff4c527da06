"""What turns a source's raw values into what a model sees, as one serialisable record.

:class:`Preprocessing` is saved in every checkpoint: the trainer prepares its batches with
:meth:`Preprocessing.prepare`, and a trained model's user calls the same object on raw inputs (arrays,
tensors, PIL images) to get exactly the tensors training used.

Fixed binarisations (validation, test, and the training set under ``static``) are a pure function of
(seed, position of the example in its split, pixel): pixel ``j`` of example ``i`` is 1 when
``u(seed, i, j) < x[i, j]``, ``u`` a counter-based hash mapped to [0, 1). So they do not depend on how a
split is batched, on the device, or on whether the split is in memory or memory-mapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rhovae.data.images import chw_image, image_array
from rhovae.errors import RhovaeError

__all__ = ["PIXEL_MODES", "SEEDS", "Preprocessing", "fixed_binarisation", "fixed_uniforms", "image_layout"]

PIXEL_MODES = ("continuous", "dynamic", "static")
# seeds of the fixed binarisations, by split; Preprocessing.__call__ binarises as the test split is
SEEDS = {"train": 0, "val": 1, "test": 2}


def image_layout(shape: tuple[int, ...]) -> str:
    """The layout (``nhw``, ``nchw``, ``nhwc`` or ``as_is``) of a stack of images of ``shape``: rank 2
    is vectors (as is), rank 3 ``(N, H, W)``, rank 4 ``(N, C, H, W)`` unless only the last axis looks
    like channels (1, 3 or 4)."""
    if len(shape) == 2:
        return "as_is"
    if len(shape) == 3:
        return "nhw"
    if shape[1] not in (1, 3, 4) and shape[-1] in (1, 3, 4):
        return "nhwc"
    return "nchw"


@dataclass
class Preprocessing:
    """From raw values to the float model input ``(N, *data_shape)``; JSON-serialisable.

    Args:
        data_shape: what the model sees per example: ``(C, H, W)`` images, ``(D,)`` vectors, or any
            shape for sources that say their arrays are not images (e.g. ``(L, K)`` sequences).
        scale: the factor the source's values were multiplied by: 1/255 for uint8 sources, else 1.
            Raw inputs are scaled by their own dtype: uint8 (and PIL images) by 1/255, floats as they are.
        image_size: S when the source's images were resized (shorter side, bilinear) and centre-cropped
            to S×S (image folders); raw images of another size get the same treatment.
        resize: the model's input size (H, W): bilinear on the device after scaling, then clamped to
            [0, 1] when the data lies there.
        channels: the channels the model sees (1 grey, 3 RGB; None for non-images); grey raw images
            are repeated, RGB ones converted with Pillow's luminance weights.
        pixels: ``continuous``, or ``dynamic``/``static`` binarisation (fixed when called on raw inputs).
        images: whether ``data_shape`` is ``(C, H, W)`` images.
        unit_interval: whether the source's values lie in [0, 1] (resized values are clamped to it).
    """

    data_shape: tuple[int, ...]
    scale: float = 1.0
    image_size: int | None = None
    resize: tuple[int, int] | None = None
    channels: int | None = None
    pixels: str = "continuous"
    images: bool = True
    unit_interval: bool = True

    def __post_init__(self) -> None:
        self.data_shape = tuple(int(n) for n in self.data_shape)
        self.resize = tuple(int(n) for n in self.resize) if self.resize is not None else None  # type: ignore[assignment]
        self.images = bool(self.images) and len(self.data_shape) == 3

    # --- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_shape"] = list(self.data_shape)
        d["resize"] = list(self.resize) if self.resize is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        if "data_shape" not in d:
            raise RhovaeError(f"preprocessing record without data_shape: {sorted(d)}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except (TypeError, ValueError, OverflowError) as e:  # a damaged or hand-made record
            raise RhovaeError(f"preprocessing record {d!r:.80} is damaged ({e})") from None

    # --- the shared path: source rows and raw inputs alike ---------------------------------------

    def prepare(self, x: Tensor, layout: str, device: torch.device | str = "cpu") -> Tensor:
        """Raw values ``x`` (N items in ``layout``; uint8, bool or float) as the float model input
        ``(N, *data_shape)`` on ``device``: layout, channels, scale, model resize."""
        if self.images:
            if layout == "nhw":
                x = x.unsqueeze(1)
            elif layout == "nhwc":
                x = x.permute(0, 3, 1, 2)
        x = x.to(device)
        if self.images:
            x = _match_channels(x, self.data_shape[0])
        # uint8 divided (not multiplied by 1/255) so values are bit-identical to earlier releases
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.images and self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
            if self.unit_interval:
                x = x.clamp_(0.0, 1.0)
        return x.contiguous()

    def __call__(self, raw: Any, device: torch.device | str = "cpu") -> Tensor:
        """Raw inputs as the float model input ``(N, *data_shape)``, prepared as the training data was.

        Images: a PIL image or a list of them; arrays/tensors ``(N, H, W)``, ``(N, C, H, W)``,
        ``(N, H, W, C)`` with C in {1, 3}, one ``(H, W)`` image, or one ``(C, H, W)`` colour image for a
        colour model (for a grey model a rank-3 array is N grey images). Vectors: ``(N, D)`` or ``(D,)``.
        Other data: ``(N, *data_shape)`` or one ``data_shape`` item. ``dynamic``/``static`` data is
        binarised as the test split is (fixed seed, by position), so the result is deterministic.
        """
        x, layout = self._as_stack(raw)
        x = self.prepare(x, layout, device)
        if self.pixels != "continuous":  # a missing value (NaN, frame sequences) stays missing
            x = torch.where(x.isnan(), x, fixed_binarisation(x, torch.arange(len(x)), SEEDS["test"]))
        return x

    # --- raw inputs -------------------------------------------------------------------------------

    def _as_stack(self, raw: Any) -> tuple[Tensor, str]:
        if _is_pil(raw) or (isinstance(raw, (list, tuple)) and raw and all(_is_pil(r) for r in raw)):
            return self._pil_stack([raw] if _is_pil(raw) else list(raw)), "nchw"
        if isinstance(raw, Tensor):
            x = raw.detach()
        else:
            a = np.asarray(raw)
            if a.dtype.kind not in "buf":
                raise RhovaeError(f"expected uint8, bool or float values, got dtype {a.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(a))
        if x.dtype != torch.uint8 and x.dtype != torch.bool and not x.is_floating_point():
            raise RhovaeError(
                f"expected uint8, bool or float values, got {x.dtype}; convert to uint8 or float32"
            )
        if not self.images:
            if tuple(x.shape) == self.data_shape:
                x = x.unsqueeze(0)
            if tuple(x.shape[1:]) != self.data_shape:
                raise RhovaeError(
                    f"expected shape (N, {', '.join(map(str, self.data_shape))}) or "
                    f"{self.data_shape}, got {tuple(x.shape)}"
                )
            return x, "as_is"
        x = self._nchw(x)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = self._crop(x)
        self._check_size(x)
        return x, "nchw"

    def _nchw(self, x: Tensor) -> Tensor:
        c = self.data_shape[0]
        if x.ndim == 2:
            return x[None, None]
        if x.ndim == 3:
            if c == 3 and x.shape[0] == 3:
                return x[None]
            if c == 3 and x.shape[-1] == 3:
                return x.permute(2, 0, 1)[None]
            return x[:, None]
        if x.ndim == 4 and x.shape[1] in (1, 3, 4, c):
            return x
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
            return x.permute(0, 3, 1, 2)
        raise RhovaeError(
            f"expected images (N, C, H, W), (N, H, W, C), (N, H, W) or one (H, W) image with C in "
            f"(1, 3) and {self._size_text()}, got shape {tuple(x.shape)}"
        )

    def _crop(self, x: Tensor) -> Tensor:
        """Folder-style resize + centre crop to image_size: uint8 through Pillow exactly as the folder
        source did it; floats with antialiased bilinear interpolation."""
        s, c = self.image_size, self.data_shape[0]
        assert s is not None
        if x.dtype == torch.uint8:
            items = x[:, :3].cpu().numpy()
            return torch.from_numpy(np.stack([image_array(chw_image(item), c, s) for item in items]))
        x = _match_channels(x.float(), c)
        h, w = x.shape[-2:]
        scale = s / min(h, w)
        new = (max(s, round(h * scale)), max(s, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
        top, left = (new[0] - s) // 2, (new[1] - s) // 2
        return x[..., top : top + s, left : left + s]

    def _pil_stack(self, images: list[Any]) -> Tensor:
        if not self.images:
            raise RhovaeError(f"this model takes arrays of shape {self.data_shape}, not images")
        arrays = [image_array(im, self.data_shape[0], self.image_size) for im in images]
        x = torch.from_numpy(np.stack(arrays)) if len({a.shape for a in arrays}) == 1 else None
        if x is None:
            raise RhovaeError(f"images of different sizes; expected {self._size_text()}")
        self._check_size(x)
        return x

    def _check_size(self, x: Tensor) -> None:
        if self.resize is None and tuple(x.shape[-2:]) != self.data_shape[1:]:
            raise RhovaeError(
                f"expected images of {self._size_text()}, got {tuple(x.shape[-2:])[0]}x{x.shape[-1]} "
                f"(shape {tuple(x.shape)})"
            )
        if x.shape[1] not in (1, 3, 4, self.data_shape[0]):
            raise RhovaeError(f"expected images with 1 or 3 channels, got shape {tuple(x.shape)}")

    def _size_text(self) -> str:
        if self.image_size is not None or self.resize is not None:
            return "any size"
        return "{}x{} pixels".format(*self.data_shape[1:])


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.")


def _match_channels(x: Tensor, channels: int) -> Tensor:
    """``(N, c, H, W)`` with ``channels`` channels: grey repeated, alpha dropped, RGB to grey with
    Pillow's integer luminance (``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16``) for uint8, its
    weights for floats."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 4:  # RGBA
        x, c = x[:, :3], 3
        if channels == 3:
            return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        if x.dtype == torch.uint8:
            r, g, b = x.int().unbind(1)
            return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * weights[:, None, None]).sum(1, keepdim=True)
    raise RhovaeError(f"cannot turn images of {c} channels into {channels}; pass channels={c} or 1/3 images")


# --- fixed binarisation: a counter-based hash ---------------------------------------------------------
# 32-bit arithmetic in int32 tensors: multiplication wraps modulo 2^32 and right shifts are made logical
# by masking, so the bits are those of the unsigned reference (checked against pure Python in the tests).


def _i32(c: int) -> int:
    """The int32 with the bits of the unsigned 32-bit ``c``."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


_C1, _C2, _KB = _i32(0x7FEB352D), _i32(0x846CA68B), _i32(0x5BD1E995)


def _mul(x: Tensor, c: int) -> Tensor:
    # a 0-d int32 tensor: multiplying int32 by a Python int takes a path ~100x slower (torch 2.x, CPU)
    return x * torch.tensor(c, dtype=torch.int32, device=x.device)


def _shr(x: Tensor, k: int) -> Tensor:
    return (x >> k) & ((1 << (32 - k)) - 1)


def _hash32(x: Tensor) -> Tensor:
    """Wellons' "lowbias32" integer hash (xor-shift-multiply) of int32 ``x``."""
    x = x ^ _shr(x, 16)
    x = _mul(x, _C1)
    x = x ^ _shr(x, 15)
    x = _mul(x, _C2)
    return x ^ _shr(x, 16)


def fixed_uniforms(positions: Tensor, n_features: int, seed: int) -> Tensor:
    """``u[i, j]`` in [0, 1) (24 bits) for example ``positions[i]`` and feature ``j``: a pure function of
    (seed, position, j), on ``positions``' device.

    With per-example keys ``ka = h(p ^ h(2 seed + 1))``, ``kb = h(ka ^ 0x5BD1E995)`` and ``h`` the
    lowbias32 hash: ``x = h(j) ^ ka``, then lowbias32's rounds with ``kb`` added between the two
    multiplications, and ``u = (x >> 8) / 2^24``. Adding ``kb`` midway keeps two examples' streams apart
    even where their first halves meet.
    """
    device = positions.device
    pos = (positions.to(torch.int64) & 0xFFFFFFFF).to(torch.int32)
    ka = _hash32(pos ^ _hash32(torch.tensor(_i32(2 * seed + 1), dtype=torch.int32, device=device)))
    kb = _hash32(ka ^ _KB)
    x = _hash32(torch.arange(n_features, dtype=torch.int32, device=device))[None, :] ^ ka[:, None]
    x = x ^ _shr(x, 16)
    x = _mul(x, _C1)
    x = x ^ _shr(x, 15)
    x = _mul(x + kb[:, None], _C2)
    x = x ^ _shr(x, 16)
    return _shr(x, 8).to(torch.float32) * 2.0**-24


def fixed_binarisation(x: Tensor, positions: Tensor, seed: int) -> Tensor:
    """Binary ``x`` ``(n, ...)`` in [0, 1]: entry ``j`` of example ``positions[i]`` is 1 when
    ``fixed_uniforms(positions, d, seed)[i, j] < x[i, j]`` (so 1 with probability ``x[i, j]``)."""
    n = len(x)
    flat = x.reshape(n, -1)
    out = torch.empty_like(flat)
    positions = positions.to(x.device)
    step = max(1, 2**18 // max(1, flat.shape[1]))  # 1 MiB int32 temporaries: in cache, few thread syncs
    for s in range(0, n, step):
        u = fixed_uniforms(positions[s : s + step], flat.shape[1], seed)
        out[s : s + step] = (u < flat[s : s + step]).to(out.dtype)
    return out.view_as(x)
