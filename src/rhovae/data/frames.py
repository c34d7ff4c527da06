"""Sequences of frames with missing values: rotating images, a not-at-random mask, and input checks.

The setting is the GP-VAE's HMNIST (Fortuin et al., "GP-VAE: Deep Probabilistic Time Series Imputation",
AISTATS 2020, arXiv:1907.04155): MNIST digits rotating over 10 frames with pixels missing not at random.
Everything here is a plain function on tensors::

    seqs, speeds = rotating_sequences(images, frames=10, seed=0)   # (N, 10, C, H, W), (N,)
    mask = mnar_mask(seqs, missing_rate=0.6, seed=1)                # bool, True = observed
    check_frame_arrays(seqs, mask)                                  # raises RhovaeError on bad input
    x, mask = pad_ragged([a, b, c])                                 # unequal lengths -> padded + mask

**What HMNIST is, from its source** (github.com/ratschlab/GP-VAE):

- ``data/load_hmnist.sh`` downloads a prebuilt ``hmnist_mnar.npz`` (the default; ``spatial``, ``random``,
  ``temporal_neg`` and ``temporal_pos`` variants also exist). The code that drew its missingness mask is
  not in the repository, so the rule behind the released file (which values go missing, how often) cannot
  be read from source, only that it is called missing not at random.
- ``train.py`` reads ``x_*_full``, ``x_*_miss`` and ``m_*_miss`` as sequences of ``time_length = 10``
  frames of 784 flattened pixels, modelled with a Bernoulli decoder; the first 50,000 training sequences
  train, the rest validate. Its mask means 1 = **missing** (``n_missings = m.sum()``; observed values are
  put back where ``m == 0``): the opposite of ours.
- ``lib/healing_mnist.py`` (adapted from a Deep-Kalman-filter loader of Healing MNIST, Krishnan et al.
  2015, arXiv:1511.05121; ``train.py`` does not call it) is the repository's frame maker: each frame
  re-rotates the *previous* one by a step drawn from Normal(0, ``max_angle``) degrees (a random walk of
  angles; defaults ``max_angle = 180``, ``seq_len = 5``) with ``scipy.ndimage.rotate`` (cubic spline, same
  size), then binarises at > 127; its square occlusions and bit-flip noise are commented out. Which
  arguments made the released file is not recorded.

**How ours differs.** Frames: one constant angular speed per sequence, uniform in
``[-max_speed, max_speed]`` radians per frame, from a uniform start angle; frame ``t`` rotates the
*source* image by ``start + t * speed`` (interpolation blur does not accumulate), with bilinear
interpolation and zero fill, and values stay grey in [0, 1] (binarise afterwards if wanted). Missingness:
an explicit two-level rule on the frames' own values (:func:`mnar_probabilities`): a value above
``threshold`` (0.5, "bright") goes missing with probability ``p_hi = bright_ratio * p_lo`` and any other
with ``p_lo``, ``p_lo`` solved from the data's bright fraction so that the expected missing fraction is
exactly ``missing_rate``; the mask means True = **observed**.

Conventions: a mask has the shape of ``x`` (one flag per value), dtype bool, True = observed; values at
missing positions are ignored (they may be anything, NaN included). 0/1 integer masks are refused rather
than guessed at, because the two conventions in use (ours, and GP-VAE's 1 = missing) are each other's
inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rhovae.errors import RhovaeError

__all__ = [
    "DEFAULT_BRIGHT_RATIO",
    "DEFAULT_MAX_SPEED",
    "check_frame_arrays",
    "mnar_mask",
    "mnar_probabilities",
    "pad_ragged",
    "rotate_images",
    "rotating_sequences",
]

# π/12 rad = 15° per frame at most. Speeds are uniform in ±15°, so the median |speed| is 7.5° and a typical
# 10-frame sequence (9 steps) turns ~67°, the fastest 135°: clearly visible. Yet a stroke 10 px from the
# centre of a 28×28 digit moves at most ~2.6 px per frame, so consecutive frames overlap (smooth in time).
DEFAULT_MAX_SPEED = math.pi / 12
# Bright values go missing 1.5× as often as dark ones. It is feasible for every bright fraction at the
# default missing_rate 0.6 (0.6 × 1.5 ≤ 1); with ~13 % bright values (roughly MNIST's share above 0.5)
# p_lo ≈ 0.56 and p_hi ≈ 0.85.
DEFAULT_BRIGHT_RATIO = 1.5
_MASK_CHUNK = 1024  # sequences per random draw in mnar_mask: bounds memory; part of the seed's meaning


def _tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) and x.dtype != object:
        return torch.as_tensor(x)
    raise RhovaeError(f"{name} is a {type(x).__name__}; give a torch tensor or a NumPy array")


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _where(flat_index: int, shape: Sequence[int]) -> str:
    """``sequence i, frame t`` of a flat index into an (N, T, ...) array."""
    per_sequence = math.prod(shape[1:])
    i, rest = divmod(flat_index, per_sequence)
    return f"sequence {i}, frame {rest // math.prod(shape[2:])}"


# --- rotation -----------------------------------------------------------------------------------------


def rotate_images(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate each image about its centre by its angle (radians), bilinear, zero fill outside.

    A positive angle turns the content counter-clockwise as displayed (row 0 at the top):
    ``rotate_images(x, π/2)`` matches ``torch.rot90(x, 1, dims=(-2, -1))`` on a square image, up to float
    rounding (~1e-6). Non-square images are rotated in pixel units (a true rotation, not one of the
    normalised square). An angle of exactly 0 returns the image bit for bit (the sampling grid would
    otherwise be off pixel centres by float rounding, ~1e-6); other angles go through
    ``torch.nn.functional.affine_grid`` + ``grid_sample`` (``align_corners=False``).

    Args:
        images: ``(N, C, H, W)`` floating, typically in [0, 1]; interpolation keeps values within the
            range of the inputs and 0.
        angles: ``(N,)`` radians, finite.

    Returns:
        ``(N, C, H, W)``, the dtype and device of ``images``.
    """
    images = _tensor(images, "images")
    angles = _tensor(angles, "angles")
    if images.ndim != 4:
        raise RhovaeError(f"images has shape {_shape(images.shape)}; give (N, C, H, W), e.g. x[:, None]")
    if not images.is_floating_point():
        raise RhovaeError(f"images has dtype {images.dtype}; give floats in [0, 1] (e.g. x.float() / 255)")
    n, _, h, w = images.shape
    if angles.shape != (n,):
        raise RhovaeError(f"angles has shape {_shape(angles.shape)}; give one angle per image, shape ({n},)")
    angles = angles.to(device=images.device, dtype=torch.float64)
    if not torch.isfinite(angles).all():
        raise RhovaeError("angles holds NaN or inf; give finite angles in radians")
    # affine_grid maps output to input coordinates, normalised to [-1, 1] per axis; in pixel units the
    # input point is R(-angle) · output point, hence the H/W factors on the off-diagonal terms.
    c, s = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(c)
    theta = torch.stack(
        [torch.stack([c, -s * (h / w), zero], -1), torch.stack([s * (w / h), c, zero], -1)], -2
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    still = angles == 0
    if still.any():
        out[still] = images[still]
    return out


def rotating_sequences(
    images: Tensor,
    frames: int = 10,
    seed: int = 0,
    max_speed: float = DEFAULT_MAX_SPEED,
    max_start: float = math.pi,
) -> tuple[Tensor, Tensor]:
    """Each image rotating at its own constant angular speed over ``frames`` frames.

    Per sequence, from ``torch.Generator().manual_seed(seed)`` (starts drawn first, then speeds): a start
    angle uniform in ``[-max_start, max_start]`` (the default π: any orientation; 0: upright first frame)
    and a speed uniform in ``[-max_speed, max_speed]`` radians per frame. Frame ``t`` is the source image
    rotated by ``start + t * speed`` (:func:`rotate_images`). The default speed, π/12 (15°) per frame,
    turns a typical digit ~67° over 10 frames (the fastest 135°) while moving strokes only a few pixels
    per frame: see :data:`DEFAULT_MAX_SPEED`.

    Args:
        images: ``(N, C, H, W)`` floating, in [0, 1].
        frames: T, frames per sequence, at least 2.
        seed: the seed of the one CPU generator that draws starts and speeds.
        max_speed: the largest |speed|, radians per frame, finite and >= 0.
        max_start: the largest |start angle|, radians, finite and >= 0.

    Returns:
        ``(sequences, speeds)``: ``(N, T, C, H, W)`` in the dtype and device of ``images``, and ``(N,)``
        float64 radians per frame (on the CPU).
    """
    images = _tensor(images, "images")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise RhovaeError(f"frames must be an integer >= 2 (a sequence needs time), got {frames!r}")
    for name, value in (("max_speed", max_speed), ("max_start", max_start)):
        if not (math.isfinite(value) and value >= 0):
            raise RhovaeError(f"{name} must be a finite number of radians >= 0, got {value!r}")
    if images.ndim != 4:
        raise RhovaeError(f"images has shape {_shape(images.shape)}; give (N, C, H, W), e.g. x[:, None]")
    n = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    starts = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * max_start
    speeds = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * max_speed
    sequences = images.new_empty((n, frames, *images.shape[1:]))
    for t in range(frames):
        sequences[:, t] = rotate_images(images, starts + t * speeds)
    return sequences, speeds


# --- missingness not at random ------------------------------------------------------------------------


def mnar_probabilities(
    bright_fraction: float, missing_rate: float = 0.6, bright_ratio: float = DEFAULT_BRIGHT_RATIO
) -> tuple[float, float]:
    """The two missing probabilities ``(p_lo, p_hi)`` of :func:`mnar_mask`.

    With ``b`` the fraction of bright values, the expected missing fraction ``b * p_hi + (1 - b) * p_lo``
    equals ``missing_rate`` and ``p_hi = bright_ratio * p_lo``, so
    ``p_lo = missing_rate / (1 + b * (bright_ratio - 1))``. ``bright_ratio = 1`` is missing completely at
    random. The ratio is feasible (``p_hi <= 1``) whenever ``missing_rate * bright_ratio <= 1``, and in
    general up to ``(1 - b) / (missing_rate - b)`` when ``missing_rate > b``; beyond that it is refused
    rather than silently capped (a cap would change the documented ratio).
    """
    if not 0 <= missing_rate < 1:  # also false for NaN
        raise RhovaeError(f"missing_rate must lie in [0, 1) (a fraction of values), got {missing_rate!r}")
    if not (math.isfinite(bright_ratio) and bright_ratio >= 1):
        raise RhovaeError(
            f"bright_ratio must be a finite number >= 1 (1: missing at random), got {bright_ratio!r}"
        )
    if not 0 <= bright_fraction <= 1:
        raise RhovaeError(f"bright_fraction must lie in [0, 1], got {bright_fraction!r}")
    b = bright_fraction
    p_lo = missing_rate / (1 + b * (bright_ratio - 1))
    p_hi = bright_ratio * p_lo
    if p_hi > 1 + 1e-12:  # the tolerance lets missing_rate * bright_ratio == 1 through despite rounding
        most = (1 - b) / (missing_rate - b)
        raise RhovaeError(
            f"bright_ratio {bright_ratio:g} needs p_hi = {p_hi:.3f} > 1 at missing_rate {missing_rate:g} "
            f"with {b:.1%} bright values; use bright_ratio <= {most:.3f} or a lower missing_rate"
        )
    return p_lo, min(p_hi, 1.0)


def mnar_mask(
    sequences: Tensor,
    missing_rate: float = 0.6,
    seed: int = 0,
    bright_ratio: float = DEFAULT_BRIGHT_RATIO,
    threshold: float = 0.5,
) -> Tensor:
    """A missing-not-at-random mask: bright values go missing more often than dark ones.

    A value ``> threshold`` goes missing with probability ``p_hi``, any other with ``p_lo``, independently,
    where ``p_hi = bright_ratio * p_lo`` and ``p_lo`` is solved from this data's bright fraction so that the
    expected missing fraction is ``missing_rate`` (:func:`mnar_probabilities`, which also says when a ratio
    is infeasible). Uniforms come from ``torch.Generator().manual_seed(seed)`` on the CPU, drawn in chunks of
    1024 sequences, so the mask depends only on the seed and the data. See the module docstring for how
    this differs from HMNIST's released mask.

    Args:
        sequences: ``(N, T, ...)`` complete values (no NaN), typically frames in [0, 1].
        missing_rate: the expected fraction of missing values, in [0, 1).
        seed: the seed of the generator.
        bright_ratio: ``p_hi / p_lo``, >= 1.
        threshold: the value above which a value counts as bright.

    Returns:
        ``(N, T, ...)`` bool on the device of ``sequences``, True = observed.
    """
    sequences = _tensor(sequences, "sequences")
    if sequences.ndim < 2 or sequences.numel() == 0:
        raise RhovaeError(f"sequences has shape {_shape(sequences.shape)}; give (N, T, ...) with values")
    if sequences.is_floating_point() and torch.isnan(sequences).any():
        raise RhovaeError("sequences holds NaN; mnar_mask needs complete data (mask the NaN yourself)")
    bright = sequences > threshold
    p_lo, p_hi = mnar_probabilities(bright.sum().item() / bright.numel(), missing_rate, bright_ratio)
    generator = torch.Generator().manual_seed(seed)
    observed = torch.empty(sequences.shape, dtype=torch.bool, device=sequences.device)
    for lo in range(0, len(sequences), _MASK_CHUNK):
        chunk = bright[lo : lo + _MASK_CHUNK]
        u = torch.rand(chunk.shape, generator=generator).to(chunk.device)
        observed[lo : lo + _MASK_CHUNK] = u >= torch.where(chunk, p_hi, p_lo)
    return observed


# --- checks for a model over frames -------------------------------------------------------------------


def check_frame_arrays(x: Any, mask: Any = None) -> None:
    """Refuse frame sequences a model cannot use, each with a one-line :class:`RhovaeError`.

    Checks, in order: ``x`` is one numeric array (a ragged object array or list points to
    :func:`pad_ragged`), of shape ``(N, T, ...)`` with N >= 1, T >= 2 and at least one value per frame;
    ``mask``, when given, has exactly the shape of ``x`` and dtype bool (True = observed; 0/1 integer masks
    are refused: see the module docstring); every sequence has an observed value; observed values are
    finite (NaN or inf at missing positions is fine).

    Args:
        x: ``(N, T, ...)`` tensor or NumPy array, e.g. ``(N, T, D)`` or ``(N, T, C, H, W)``.
        mask: None (all observed) or ``(N, T, ...)`` bool, True = observed.
    """
    if isinstance(x, (list, tuple)):
        raise RhovaeError(
            f"x is a {type(x).__name__} of {len(x)} sequences; give one array: np.stack(x), or "
            "x, mask = pad_ragged(x) for unequal lengths"
        )
    if isinstance(x, np.ndarray) and x.dtype == object:
        raise RhovaeError(
            f"x is an object array of shape {_shape(x.shape)} (ragged sequences?); pad it into one array "
            "with a mask: x, mask = pad_ragged(list_of_sequences)"
        )
    x = _tensor(x, "x")
    if x.is_complex():
        raise RhovaeError(f"x has dtype {x.dtype}; give real values")
    if x.ndim < 3:
        raise RhovaeError(
            f"x has shape {_shape(x.shape)}; give (N, T, ...) with a feature axis per frame: x[..., None]"
        )
    n, t = x.shape[:2]
    if n == 0:
        raise RhovaeError(f"x has shape {_shape(x.shape)}: no sequences; give at least one")
    if t == 1:
        raise RhovaeError(
            f"x has shape {_shape(x.shape)}, T = 1: a single frame has no time; use --model cnn or mlp"
        )
    if t == 0 or 0 in x.shape[2:]:
        raise RhovaeError(f"x has shape {_shape(x.shape)}: its frames hold no values; give T >= 2 frames")
    finite = torch.isfinite(x) if x.is_floating_point() else None
    if mask is None:
        if finite is not None and not finite.all():
            bad = (~finite).flatten()
            raise RhovaeError(
                f"x holds {int(bad.sum())} NaN/inf values (first at {_where(int(bad.nonzero()[0]), x.shape)})"
                "; give a mask with them False (True = observed) or fill them"
            )
        return
    if isinstance(mask, np.ndarray) and mask.dtype == object:
        raise RhovaeError("mask is an object array; give a bool array of x's shape (pad_ragged makes one)")
    mask = _tensor(mask, "mask")
    if mask.shape != x.shape:
        raise RhovaeError(
            f"mask has shape {_shape(mask.shape)} but x has {_shape(x.shape)}; give one flag per value, "
            f"shape {_shape(x.shape)}, True = observed"
        )
    if mask.dtype != torch.bool:
        raise RhovaeError(
            f"mask has dtype {mask.dtype}; give dtype bool, True = observed: mask != 0 if 1 means observed, "
            "mask == 0 if 1 means missing (GP-VAE's m_*_miss)"
        )
    mask = mask.to(x.device)
    empty = ~mask.flatten(1).any(1)
    if empty.any():
        first = int(empty.nonzero()[0])
        raise RhovaeError(
            f"sequence {first} has no observed value ({int(empty.sum())} such sequences); drop them or "
            "observe at least one value in each"
        )
    if finite is not None:
        bad = (mask & ~finite).flatten()
        if bad.any():
            raise RhovaeError(
                f"x holds {int(bad.sum())} NaN/inf values where mask says observed (first at "
                f"{_where(int(bad.nonzero()[0]), x.shape)}); set mask False there or fill them"
            )


def pad_ragged(sequences: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """Pad sequences of unequal length into one array plus the mask that marks their real frames.

    Args:
        sequences: N arrays or tensors ``(T_i, ...)``, T_i >= 1, all with one frame shape.

    Returns:
        ``(x, mask)``: ``x`` is ``(N, max T_i, ...)`` in the promoted dtype of the inputs, with
        ``x[i, :T_i] = sequences[i]`` and zeros after; ``mask`` is bool of the same shape, True exactly on
        ``[i, :T_i]``. Both on the CPU (or the first input's device).
    """
    if isinstance(sequences, (Tensor, np.ndarray)) and sequences.dtype != object:
        raise RhovaeError("sequences is already one array; pad_ragged takes a list of (T_i, ...) arrays")
    items = [_tensor(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
    if not items:
        raise RhovaeError("pad_ragged got no sequences; give a non-empty list of (T_i, ...) arrays")
    frame = items[0].shape[1:]
    for i, s in enumerate(items):
        if s.ndim < 1 or len(s) == 0:
            raise RhovaeError(f"sequences[{i}] has shape {_shape(s.shape)}: no frames; drop it")
        if s.shape[1:] != frame:
            raise RhovaeError(
                f"sequences[{i}] has frames of shape {_shape(s.shape[1:])} but sequences[0] "
                f"{_shape(frame)}; give every frame one shape"
            )
    dtype = items[0].dtype
    for s in items[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    device = items[0].device
    longest = max(len(s) for s in items)
    x = torch.zeros((len(items), longest, *frame), dtype=dtype, device=device)
    mask = torch.zeros(x.shape, dtype=torch.bool, device=device)
    for i, s in enumerate(items):
        x[i, : len(s)] = s.to(device=device, dtype=dtype)
        mask[i, : len(s)] = True
    return x, mask
