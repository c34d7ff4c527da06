"""Frame-sequence datasets for the frames model: ``rotating:NAME`` and ``npz:PATH`` with masks.

A split is a float tensor ``(N, T, *frame)`` whose **missing values are NaN**: the model's likelihood
scores the observed values only (:class:`rhovae.likelihoods.MaskedObservations`), and the encoder reads
the mask from the NaN. Where the complete values are known (always for ``rotating:``; for ``npz:`` when
the file holds ``*_full`` arrays) ``Data.truth[split]`` keeps them, and the evaluation scores the
imputation of the missing values against them.

``rotating:mnist-5k``, ``rotating:fashion-mnist`` and ``rotating:mnist``: the image dataset's splits
(the same as the image runs', see :func:`rhovae.data.load_data`), each image turned into ``T`` frames
rotating at a random constant speed (:func:`rhovae.data.frames.rotating_sequences`), then a
missing-not-at-random mask at rate ``missing_rate`` (:func:`rhovae.data.frames.mnar_mask`). Rotations
and masks are drawn with fixed seeds per split (:data:`ROTATION_SEEDS`, :data:`MASK_SEEDS`), so every run
sees the same sequences and gaps. ``limit`` keeps the first images of each split *before* rotation.

``npz:PATH`` with ``--model frames``: arrays ``train`` [, ``val``, ``test``] of shape ``(N, T, ...)``
(uint8 scaled by 1/255, float or bool as they are), with ``train_mask``/``val_mask``/``test_mask``
(bool, True = observed, the array's shape; or one ``mask`` when only ``train`` is given) and optionally
``train_full``/``val_full``/``test_full``, the complete values, for imputation metrics. Splits follow
the image rule (test and validation split off ``train`` with seed 0 when absent).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rhovae.data.core import Data, _split_plan, load_data
from rhovae.data.frames import DEFAULT_BRIGHT_RATIO, check_frame_arrays, mnar_mask, rotating_sequences
from rhovae.data.preprocessing import SEEDS, Preprocessing, fixed_binarisation
from rhovae.data.sources import RawSplits
from rhovae.errors import RhovaeError

__all__ = ["FRAME_KEYS", "MASK_SEEDS", "ROTATION_SEEDS", "load_frames"]

ROTATION_SEEDS = {"train": 101, "val": 102, "test": 103}
MASK_SEEDS = {"train": 201, "val": 202, "test": 203}
SPLITS = ("train", "val", "test")
#: the arrays a frames ``.npz`` may hold
FRAME_KEYS = (
    *SPLITS,
    "mask",
    *(f"{k}_mask" for k in SPLITS),
    *(f"{k}_full" for k in SPLITS),
)


def load_frames(
    name: str,
    data_dir: str | Path | None = None,
    pixels: str = "continuous",
    val_size: int = 0,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    frames: int = 10,
    missing_rate: float = 0.6,
    unit_interval: bool = False,
) -> Data:
    """Load ``rotating:NAME`` or ``npz:PATH`` as frame sequences (see the module docstring).

    ``pixels``: ``continuous`` (grey levels) or ``static`` (each complete value binarised once with a fixed
    seed, before the mask; the ground truth is the binary frames). ``frames`` and ``missing_rate`` shape
    ``rotating:`` data only. ``unit_interval`` (Bernoulli-family likelihoods) requires values in [0, 1],
    as ``static`` binarisation does."""
    if pixels not in ("continuous", "static"):
        raise RhovaeError(
            f"frame sequences take --pixels continuous or static, not {pixels} (a fresh binarisation each "
            "epoch would redraw the ground truth of the missing values)"
        )
    device = torch.device(device)
    limit = limit or None
    if name.startswith("rotating:"):
        complete, observed, meta, source = _rotating(name, data_dir, val_size, limit, frames, missing_rate)
        truth_keys = SPLITS
    else:
        complete, observed, truth_keys, meta, source = _npz_frames(name, data_dir, val_size, limit)
    unit = all(bool(((t >= 0) & (t <= 1)).all()) for t in complete.values())
    if not unit and (unit_interval or pixels == "static"):
        lo = min(float(t.min()) for t in complete.values())
        hi = max(float(t.max()) for t in complete.values())
        need = "static binarisation" if pixels == "static" else "a Bernoulli-family likelihood"
        raise RhovaeError(
            f"{name}: values lie in [{lo:g}, {hi:g}], outside the [0, 1] that {need} needs; use "
            "--likelihood gaussian (and --pixels continuous) or rescale the data to [0, 1]"
        )
    splits: dict[str, Tensor] = {}
    truth: dict[str, Tensor] = {}
    for key in SPLITS:
        x = complete[key]
        if pixels == "static":
            x = fixed_binarisation(x, torch.arange(len(x)), SEEDS[key])
        if key in truth_keys:
            truth[key] = x.to(device)
        mask = observed[key]
        splits[key] = (x if mask is None else x.masked_fill(~mask, float("nan"))).to(device)
        meta.setdefault("observed_fraction", {})[key] = (
            1.0 if mask is None else round(float(mask.float().mean()), 6)
        )
    data_shape = tuple(splits["train"].shape[1:])
    prep = Preprocessing(data_shape, pixels=pixels, images=False, unit_interval=unit)
    return Data(
        splits["train"], splits["val"], splits["test"], pixels, source, name, data_shape,
        meta=meta, preprocessing=prep, device=device, truth=truth,
    )  # fmt: skip


def _rotating(
    name: str, data_dir: str | Path | None, val_size: int, limit: int | None, frames: int, missing_rate: float
) -> tuple[dict[str, Tensor], dict[str, Tensor | None], dict, str]:
    base = name.partition(":")[2]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise RhovaeError(f"frames must be an integer >= 2 (a sequence needs time), got {frames!r}")
    images = load_data(base, data_dir, val_size=val_size, limit=limit)
    complete: dict[str, Tensor] = {}
    observed: dict[str, Tensor | None] = {}
    for key in SPLITS:
        split = getattr(images, key)
        x = split if isinstance(split, Tensor) else split.to_tensor()
        complete[key], _ = rotating_sequences(x, frames=frames, seed=ROTATION_SEEDS[key])
        bright = float((complete[key] > 0.5).float().mean())
        most = (
            1 + bright * (DEFAULT_BRIGHT_RATIO - 1)
        ) / DEFAULT_BRIGHT_RATIO  # p_hi = 1 (mnar_probabilities)
        if missing_rate > most:
            raise RhovaeError(
                f"--missing-rate {missing_rate:g} is too high for {name}'s {key} frames ({bright:.1%} bright "
                f"values, missing {DEFAULT_BRIGHT_RATIO:g}x as often as dark ones): use at most {most:.3f}"
            )
        observed[key] = mnar_mask(complete[key], missing_rate, seed=MASK_SEEDS[key]) if missing_rate else None
    meta = {
        "frames": frames,
        "missing_rate": missing_rate,
        "rotation_seeds": ROTATION_SEEDS,
        "mask_seeds": MASK_SEEDS,
        "base": base,
    }
    return complete, observed, meta, f"{images.source}, rotating over {frames} frames"


def _npz_frames(
    name: str, data_dir: str | Path | None, val_size: int, limit: int | None
) -> tuple[dict[str, Tensor], dict[str, Tensor | None], tuple[str, ...], dict, str]:
    path = Path(name.partition(":")[2]).expanduser()
    if data_dir is not None and not path.is_absolute():
        path = Path(data_dir).expanduser() / path
    if not path.is_file() or path.suffix.lower() != ".npz":
        raise RhovaeError(
            f"{path}: no such .npz file; the frames model reads numpy.savez(PATH, train=X (N, T, ...)"
            "[, train_mask=M, test=..., test_mask=..., test_full=...])"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in FRAME_KEYS}
            names = list(npz.files)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise RhovaeError(
                f"{path}: holds an object array (sequences of unequal length?); pad them into one array "
                "with rhovae.data.frames.pad_ragged and save its mask as train_mask"
            ) from None
        raise RhovaeError(f"{path}: not a readable .npz file ({e}); save it with numpy.savez") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise RhovaeError(f"{path}: not a readable .npz file ({e}); save it with numpy.savez") from None
    if "train" not in arrays:
        raise RhovaeError(
            f"{path}: no array named 'train' (found: {', '.join(sorted(names)) or 'none'}); save it as "
            "numpy.savez(PATH, train=X (N, T, ...)[, train_mask=M, ...])"
        )
    if "mask" in arrays:
        if "train_mask" in arrays:
            raise RhovaeError(f"{path}: holds both 'mask' and 'train_mask'; keep one (train_mask)")
        if "val" in arrays or "test" in arrays:
            raise RhovaeError(
                f"{path}: a single 'mask' is for a file with 'train' only; give train_mask, val_mask and "
                "test_mask, one per split"
            )
        arrays["train_mask"] = arrays.pop("mask")
    for key in SPLITS:
        if f"{key}_mask" in arrays and key not in arrays:
            raise RhovaeError(f"{path}: holds {key}_mask but no {key} array; save both or neither")
        if f"{key}_full" in arrays and key not in arrays:
            raise RhovaeError(f"{path}: holds {key}_full but no {key} array; save both or neither")
    values: dict[str, Tensor] = {}
    masks: dict[str, Tensor | None] = {}
    fulls: dict[str, Tensor] = {}
    for key in SPLITS:
        if key not in arrays:
            continue
        x, where = arrays[key], f"{path} ({key})"
        if x.dtype.kind not in "buf" or (x.dtype.kind == "u" and x.dtype != np.uint8):
            raise RhovaeError(f"{where}: dtype {x.dtype}; use uint8 (0-255), bool or float32 values")
        mask = arrays.get(f"{key}_mask")
        try:
            check_frame_arrays(x, mask)
        except RhovaeError as e:
            raise RhovaeError(f"{where}: {e}") from None
        values[key] = _floats(x)
        masks[key] = torch.from_numpy(mask) if mask is not None else None
        if f"{key}_full" in arrays:
            full = arrays[f"{key}_full"]
            if full.shape != x.shape:
                raise RhovaeError(
                    f"{path} ({key}_full): shape {full.shape}, but {key} is {x.shape}; give the complete "
                    "values in the shape of the data"
                )
            try:
                check_frame_arrays(full)
            except RhovaeError as e:
                raise RhovaeError(f"{path} ({key}_full): {e}") from None
            fulls[key] = _floats(full)
    shapes = {tuple(v.shape[1:]) for v in values.values()}
    if len(shapes) > 1:
        raise RhovaeError(
            f"{path}: splits have different sequence shapes {sorted(shapes)}; give every split one (T, ...)"
        )
    raw = RawSplits(
        train=values["train"].numpy(), val=_numpy(values.get("val")), test=_numpy(values.get("test")),
        source=f".npz frame sequences {path}", files={k: f"{path} ({k})" for k in values},
    )  # fmt: skip
    plan = _split_plan(raw, name, val_size)
    origin = {"train": "train", "val": "val" if "val" in values else "train"}
    origin["test"] = "test" if "test" in values else "train"
    complete: dict[str, Tensor] = {}
    observed: dict[str, Tensor | None] = {}
    truth_keys = []
    for key, (_, rows, _) in plan.items():
        rows_t = torch.from_numpy(rows[:limit])
        src = origin[key]
        mask = masks[src]
        if src in fulls:
            complete[key] = fulls[src][rows_t]
            truth_keys.append(key)
            if mask is not None:  # the observed values are the data's, the rest the complete array's
                complete[key] = torch.where(mask[rows_t], values[src][rows_t], complete[key])
        else:
            complete[key] = values[src][rows_t]
            if mask is not None:  # unknown at missing positions: any finite filler; NaN'ed below
                complete[key] = complete[key].nan_to_num(0.0, posinf=0.0, neginf=0.0)
        observed[key] = mask[rows_t] if mask is not None else None
        if len(complete[key]) == 0:
            raise RhovaeError(f"{path}: the {key} split is empty; give more sequences or a smaller limit")
    meta = {"frames": int(values["train"].shape[1]), "missing_rate": None, "file": str(path)}
    return complete, observed, tuple(truth_keys), meta, raw.source


def _floats(a: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


def _numpy(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy()
