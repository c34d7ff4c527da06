"""From a source's raw arrays to :class:`Data`: validation, splits, pixel modes, device tensors, batches.

A split is either a float tensor ``(N, *data_shape)`` on the training device (when its float32 size fits
``in_memory_limit_mb``: batches are then index gathers, no per-example Python, no DataLoader) or an
:class:`ArraySplit` that gathers rows from a (memory-mapped) NumPy array batch by batch. Both prepare rows
with the same :meth:`Preprocessing.prepare` and binarise with the same position-keyed hash, so for the
same indices they return the same values.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch import Tensor

from rhovae.data.preprocessing import PIXEL_MODES, SEEDS, Preprocessing, fixed_binarisation, image_layout
from rhovae.data.sources import ARRAY_KEYS, RawSplits, SourceOptions, check_dataset_name, open_source
from rhovae.errors import RhovaeError

log = logging.getLogger(__name__)

__all__ = [
    "ArraySplit",
    "Data",
    "Split",
    "auto_size",
    "batch_bounds",
    "batches",
    "load_data",
    "shard_bounds",
]

MAX_AUTO_SIZE = 5000


class ArraySplit:
    """A split held as rows of a NumPy array (memory-mapped or in RAM), gathered on demand.

    ``split[idx]`` (a slice, an int, or 1-D indices as a LongTensor/ndarray) copies the rows ``rows[idx]``
    of ``array`` with one NumPy gather (for a memory map, only those rows' pages are read) and returns the
    float tensor ``(n, *data_shape)`` on ``device``, prepared and (with ``seed``) binarised exactly as an
    in-memory split is. Sorting each batch's rows for locality was tried and not kept: on batches of 128
    rows of a 60,000 × 784 uint8 map it cost ~20 % from the page cache and saved only ~5 % on cold reads.
    """

    def __init__(
        self,
        array: np.ndarray,
        rows: np.ndarray,
        layout: str,
        preprocessing: Preprocessing,
        device: torch.device,
        seed: int | None = None,
    ) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)  # the array's rows, in split order
        self.layout = layout
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.preprocessing.data_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __repr__(self) -> str:
        kind = "memory-mapped" if isinstance(self.array, np.memmap) else "in RAM"
        return f"ArraySplit({tuple(self.shape)}, {kind} {self.array.dtype}, device={self.device})"

    def __getitem__(self, idx: int | slice | Tensor | np.ndarray) -> Tensor:
        if isinstance(idx, slice):
            r = range(len(self))[idx]
            positions = torch.arange(r.start, r.stop, r.step, dtype=torch.int64)
        elif isinstance(idx, (int, np.integer)):
            return self[torch.tensor([range(len(self))[idx]])][0]
        else:
            positions = torch.as_tensor(idx).cpu()
            positions = (
                positions.nonzero()[:, 0] if positions.dtype == torch.bool else positions.long().reshape(-1)
            )
        rows = self.rows[positions.numpy()]
        raw = torch.from_numpy(_gather(self.array, rows))
        x = self.preprocessing.prepare(raw, self.layout, self.device)
        if self.seed is not None:
            x = fixed_binarisation(x, positions, self.seed)
        return x

    def to_tensor(self, chunk_bytes: int = 2**26) -> Tensor:
        """The whole split as one device tensor, gathered in chunks of about ``chunk_bytes`` of raw data."""
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        per_row = max(1, self.array[:1].nbytes)
        step = max(1, chunk_bytes // per_row)
        for start in range(0, len(self), step):
            out[start : start + step] = self[start : start + step]
        return out


Split = Tensor | ArraySplit


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``; for a memory map its file's size is checked first, so a file cut short while
    training is an error at the next batch, not a SIGBUS. (Reading rows with ``pread`` instead closes
    the remaining window, the gather itself, but cost 3.5x the gather time; measured with
    benchmarks/bench_data.py.)"""
    filename = getattr(array, "filename", None)
    if isinstance(array, np.memmap) and filename:
        try:
            size = os.stat(filename).st_size
        except OSError as e:
            raise RhovaeError(f"{filename}: cannot read the memory-mapped data ({e.strerror})") from None
        if size < array.offset + array.nbytes:
            raise _truncated(filename, size, array.offset + array.nbytes)
    return np.asarray(array[rows])


def _truncated(path: str, size: int, need: int) -> RhovaeError:
    return RhovaeError(
        f"{path} was cut short while rhovae read it ({size} of {need} bytes); restore the file and "
        "continue with --resume"
    )


@dataclass
class Data:
    """Train, validation and test splits of one dataset on one device, ready for a model.

    Each split has ``len(split)`` and ``split[idx]`` (slice or 1-D indices) giving float ``(n, *data_shape)``
    on ``device``: a plain tensor when it fits in memory, else an :class:`ArraySplit`. ``val`` and ``test``
    are binarised with fixed seeds under ``static``/``dynamic`` pixels, ``train`` once under ``static``
    and per batch under ``dynamic`` (:meth:`train_batches`). Labels are int64 on the CPU (None when the
    source has none); ``meta`` holds the source's JSON-serialisable extras (e.g. ``classes``).
    Frame sequences (:func:`rhovae.data.frame_data.load_frames`) mark missing values NaN and keep the
    complete values, where known, in ``truth`` (split name -> tensor).
    """

    train: Split
    val: Split
    test: Split
    pixels: str = "continuous"
    source: str = ""
    name: str = ""
    data_shape: tuple[int, ...] = ()  # () = the train split's item shape
    train_labels: Tensor | None = field(default=None, repr=False)
    val_labels: Tensor | None = field(default=None, repr=False)
    test_labels: Tensor | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = field(default=None, repr=False)  # None: data_shape, no scaling
    device: torch.device | None = None  # None: the train split's device
    #: the complete values of splits with missing values (NaN), where known (frame sequences)
    truth: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.data_shape = tuple(self.data_shape) or tuple(self.train.shape[1:])
        self.device = torch.device(self.device) if self.device is not None else self.train.device
        if self.preprocessing is None:
            self.preprocessing = Preprocessing(self.data_shape, pixels=self.pixels)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(getattr(self, k))}" for k in ("train", "val", "test"))
        return (
            f"Data({self.name!r}: {sizes}, data_shape={self.data_shape}, pixels={self.pixels!r}, "
            f"device={self.device}, source={self.source!r})"
        )

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The old name of :attr:`data_shape`."""
        return self.data_shape

    def train_batches(
        self,
        batch_size: int,
        shuffle: torch.Generator,
        pixels: torch.Generator,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Tensor]:
        """One epoch of training batches ``(b, *data_shape)`` in a random order drawn from ``shuffle`` (a CPU
        generator); under ``dynamic`` pixels each batch is binarised with ``pixels`` (a generator on the
        data's device). In-memory and memory-mapped splits give the same batches.

        Sharded across ``world`` processes (DDP), ``batch_size`` is the global batch: every rank draws the
        same permutation from identically seeded generators and takes rank ``rank``'s contiguous share of
        each global batch (:func:`shard_bounds`; a last partial batch smaller than ``world`` leaves some
        ranks an empty batch ``(0, *data_shape)``). Only the rank's own rows are gathered; the dynamic
        binarisation is drawn for the whole global batch (the other rows as zeros), so the ranks' batches
        together are exactly the one-process batch."""
        order = torch.randperm(len(self.train), generator=shuffle)
        if isinstance(self.train, Tensor):
            order = order.to(self.train.device)
        for start, stop in batch_bounds(len(order), batch_size):
            rows = order[start:stop]
            if world == 1:
                x = self.train[rows]
                yield torch.bernoulli(x, generator=pixels) if self.pixels == "dynamic" else x
                continue
            lo, hi = shard_bounds(len(rows), rank, world)
            x = self.train[rows[lo:hi]]
            if self.pixels == "dynamic":
                # one draw per element of the global batch, as one process makes; zeros elsewhere
                whole = x.new_zeros((len(rows), *x.shape[1:]))
                whole[lo:hi] = x
                x = torch.bernoulli(whole, generator=pixels)[lo:hi]
            yield x


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` of each training batch of an epoch over ``n`` examples: ``batch_size`` each,
    except that a last batch of one example takes a second one from the batch before it. A batch of
    one has no batch statistics (BatchNorm) and no unbiased MMD, so no epoch ends on one."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1 and batch_size > 2:
        (a, _), (_, e) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, e - 2), (e - 2, e)]
    return bounds


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s contiguous share of ``n`` items split over ``world`` ranks, sizes
    differing by at most one (the first ``n % world`` ranks take one more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Batches of ``split`` (a tensor or :class:`ArraySplit`): in order when ``generator`` is None, else in
    a random order drawn from it (a CPU generator)."""
    n = len(split)
    if generator is None:
        for start in range(0, n, batch_size):
            yield split[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator)
    if isinstance(split, Tensor):
        order = order.to(split.device)
    for start in range(0, n, batch_size):
        yield split[order[start : start + batch_size]]


def auto_size(n: int) -> int:
    """The default held-out size for ``n`` examples: 10 %, at least 1, at most 5,000."""
    return min(MAX_AUTO_SIZE, max(1, n // 10))


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    pixels: str = "continuous",
    val_size: int = 0,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    size: tuple[int, int] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    in_memory_limit_mb: float = 2048,
    unit_interval: bool = False,
    raw: RawSplits | None = None,
) -> Data:
    """Load dataset ``name`` (a built-in name, ``npz:PATH`` or ``folder:PATH``) as :class:`Data`.

    Splits (all fixed by seed 0, the same for every run): a source without a test split gives the last
    ``auto_size(N)`` examples of a permutation of its training set as test examples; validation is then
    the last ``val_size`` examples of a permutation of what remains (``val_size=0``: ``auto_size``, 10 %
    at most 5,000), unless the source has its own (then ``val_size`` must stay 0). ``limit`` keeps the
    first examples of each split (quick trials). The test split is never used for selection.

    ``size`` resizes images to the model's input (H, W) (bilinear, on the device); ``image_size`` and
    ``channels`` shape image folders (see :func:`~rhovae.data.sources.folder_source`) and ``channels``
    converts other images (1 ↔ 3). A split whose float32 size exceeds ``in_memory_limit_mb`` stays in its
    (memory-mapped) array and is gathered batch by batch. ``unit_interval`` (Bernoulli-family
    likelihoods) requires values in [0, 1], as binarised pixels do. 0 for ``limit``, ``image_size`` or
    ``channels`` means unset, as in the config. ``raw``: arrays already in hand (see
    :func:`raw_from_python`), loaded under the label ``name`` instead of a named source.
    """
    if raw is None:
        check_dataset_name(name)
    if pixels not in PIXEL_MODES:
        raise RhovaeError(f"unknown pixel mode {pixels!r}; choose one of: {', '.join(PIXEL_MODES)}")
    limit, image_size, channels = limit or None, image_size or None, channels or None
    if channels not in (None, 1, 3):
        raise RhovaeError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    for label, value in (("val_size", val_size), ("limit", limit or 0), ("image_size", image_size or 0)):
        if value < 0:
            raise RhovaeError(f"{label} must be positive (or 0: unset), got {value}")
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) <= 0:
            raise RhovaeError(f"size must be two positive numbers (H, W), got {size}")
    if in_memory_limit_mb < 0:
        raise RhovaeError(f"in_memory_limit_mb must be >= 0, got {in_memory_limit_mb}")
    device = torch.device(device)

    if raw is None:
        raw = open_source(
            name,
            Path(data_dir).expanduser() if data_dir is not None else None,
            SourceOptions(image_size=image_size, channels=channels),
        )
    need = (
        "a Bernoulli-family likelihood" if unit_interval else "binarisation" if pixels != "continuous" else ""
    )
    unit = _check_arrays(raw, need)
    prep, layout = _preprocessing(raw, name, pixels, size, image_size, channels, unit)
    plan = _split_plan(raw, name, val_size)

    splits: dict[str, Split] = {}
    labels: dict[str, Tensor | None] = {}
    budget = in_memory_limit_mb * 2**20
    mapped = []
    for key, (array, rows, split_labels) in plan.items():
        rows = rows[:limit]
        fixed = pixels == "static" or (pixels == "dynamic" and key != "train")
        split = ArraySplit(array, rows, layout, prep, device, SEEDS[key] if fixed else None)
        if len(rows) * math.prod(prep.data_shape) * 4 <= budget:
            splits[key] = split.to_tensor()
        else:
            splits[key] = split
            mapped.append(key)
        labels[key] = torch.from_numpy(split_labels[rows]) if split_labels is not None else None
    if mapped:
        log.info(
            "dataset %s: %s gathered batch by batch (over %g MB as float32)",
            name,
            "/".join(mapped),
            in_memory_limit_mb,
        )
    return Data(
        splits["train"],
        splits["val"],
        splits["test"],
        pixels,
        raw.source,
        name,
        prep.data_shape,
        train_labels=labels["train"],
        val_labels=labels["val"],
        test_labels=labels["test"],
        meta=dict(raw.meta),
        preprocessing=prep,
        device=device,
    )


# --- validation ---------------------------------------------------------------------------------------


def _check_arrays(raw: RawSplits, need_unit: str) -> bool:
    """Check dtypes, ranks, shapes, labels and values (NaN/inf, and [0, 1] when ``need_unit`` names why);
    True when every value lies in [0, 1]. Float arrays are scanned in chunks (bounded memory)."""
    train = raw.train
    unit = True
    for key in ("train", "val", "test"):
        a = getattr(raw, key)
        if a is None:
            continue
        where = raw.where(key)
        if not isinstance(a, np.ndarray):
            a = np.asarray(a)
        if a.dtype.kind not in "buf" or (a.dtype.kind == "u" and a.dtype != np.uint8):
            raise RhovaeError(
                f"{where}: array {key!r} has dtype {a.dtype}; use uint8 pixels (0-255), bool or float32"
            )
        if (raw.images and a.ndim not in (2, 3, 4)) or a.ndim < 2:
            raise RhovaeError(
                f"{where}: array {key!r} has shape {a.shape}; expected (N, D) vectors, (N, H, W) or "
                f"(N, C, H, W) images"
            )
        if not a.dtype.isnative:  # torch shares native byte order only; this copy is in RAM
            a = a.astype(a.dtype.newbyteorder("="))
        setattr(raw, key, a)
        if len(a) == 0:
            raise RhovaeError(f"{where}: array {key!r} is empty")
        if 0 in a.shape[1:]:
            raise RhovaeError(
                f"{where}: array {key!r} has shape {a.shape}: its items hold no values; give at least one "
                "feature per example"
            )
        if key != "train":
            if a.shape[1:] != train.shape[1:]:
                raise RhovaeError(
                    f"{where}: {key} items have shape {a.shape[1:]} but train items {train.shape[1:]}; "
                    f"give every split the same item shape"
                )
            if (a.dtype == np.uint8) != (train.dtype == np.uint8):
                raise RhovaeError(
                    f"{where}: {key} is {a.dtype} but train is {train.dtype}; give every split the same dtype"
                )
        _check_labels(raw, key, len(a))
        if a.dtype.kind == "f":
            lo, hi = _value_range(a, where, key)
            if need_unit and (lo < 0 or hi > 1):
                fix = "use --likelihood gaussian" if "likelihood" in need_unit else "use --pixels continuous"
                raise RhovaeError(
                    f"{where}: {key} values lie in [{lo:g}, {hi:g}], outside the [0, 1] that {need_unit} "
                    f"needs; {fix} or rescale the data to [0, 1]"
                )
            unit = unit and lo >= 0 and hi <= 1
    return unit


def _check_labels(raw: RawSplits, key: str, n: int) -> None:
    labels = getattr(raw, f"{key}_labels")
    if labels is None:
        return
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    where = raw.where(f"{key}_labels")
    if labels.dtype.kind not in "biu" or labels.ndim != 1:
        raise RhovaeError(
            f"{where}: {key}_labels must be integers of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(labels) != n:
        raise RhovaeError(
            f"{where}: {key}_labels has {len(labels)} entries for {n} {key} examples; give one per example"
        )
    setattr(raw, f"{key}_labels", labels.astype(np.int64))


def _value_range(a: np.ndarray, where: str, key: str, chunk: int = 2**24) -> tuple[float, float]:
    """(min, max) of a float array, read ``chunk`` values at a time; NaN/inf raise naming the example."""
    step = max(1, chunk // max(1, math.prod(a.shape[1:])))
    lo, hi = math.inf, -math.inf
    for start in range(0, len(a), step):
        c = np.asarray(a[start : start + step])
        finite = np.isfinite(c)
        if not finite.all():
            first = start + int(np.argmin(finite.reshape(len(c), -1).all(axis=1)))
            raise RhovaeError(
                f"{where}: {key} holds NaN or inf (first in example {first}); remove or replace them"
            )
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    return lo, hi


def _preprocessing(
    raw: RawSplits,
    name: str,
    pixels: str,
    size: tuple[int, int] | None,
    image_size: int | None,
    channels: int | None,
    unit: bool,
) -> tuple[Preprocessing, str]:
    shape = raw.train.shape
    scale = 1 / 255 if raw.train.dtype == np.uint8 else 1.0
    layout = image_layout(shape) if raw.images else "as_is"
    if layout == "as_is":
        what = f"vectors of {shape[1]} values" if raw.images else f"arrays of shape {shape[1:]}"
        for label, value in (
            ("size (the model's input size)", size),
            ("image_size", image_size),
            ("channels", channels),
        ):
            if value is not None:
                raise RhovaeError(f"{name}: holds {what}, not images; {label} applies to images only")
        return Preprocessing(shape[1:], scale, pixels=pixels, images=False, unit_interval=unit), layout
    if layout == "nhw":
        c, h, w = 1, *shape[1:]
    elif layout == "nhwc":
        h, w, c = shape[1:]
    else:
        c, h, w = shape[1:]
    if image_size is not None and (h, w) != (image_size, image_size):
        raise RhovaeError(
            f"{raw.where('train')}: images are {h}x{w}; image_size resizes image folders only, so pass the "
            f"model's input size instead or resize the arrays"
        )
    target = channels or (3 if c == 4 and layout == "nhwc" else c)  # (N, H, W, 4) is RGBA
    if target != c and {c, target} not in ({1, 3}, {4, 3}, {4, 1}):
        raise RhovaeError(
            f"{raw.where('train')}: images have {c} channels; cannot make {target}, leave channels unset"
        )
    data_shape = (target, *(size or (h, w)))
    prep = Preprocessing(data_shape, scale, image_size, size, target, pixels, images=True, unit_interval=unit)
    return prep, layout


def _split_plan(
    raw: RawSplits, name: str, val_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(array, rows, labels) per split; see :func:`load_data` for the rule."""
    n = len(raw.train)
    pool = np.random.default_rng(0).permutation(n)
    plan: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    if raw.test is None:
        if n < 3:
            raise RhovaeError(
                f"{raw.where('train')}: {n} examples are too few to split off validation and test examples"
            )
        n_test = auto_size(n)
        plan["test"] = (raw.train, pool[-n_test:], raw.train_labels)
        pool = pool[:-n_test]
    else:
        plan["test"] = (raw.test, np.arange(len(raw.test)), raw.test_labels)
    if raw.val is not None:
        if val_size:
            raise RhovaeError(
                f"{raw.where('val')}: the dataset brings its own validation split; leave val_size at 0"
            )
        plan["val"] = (raw.val, np.arange(len(raw.val)), raw.val_labels)
        plan["train"] = (raw.train, pool if raw.test is None else np.arange(n), raw.train_labels)
    else:
        m = len(pool)
        v = val_size or auto_size(m)
        if not 0 < v < m:
            raise RhovaeError(
                f"val_size must be between 1 and {m - 1} for {name} ({m} training examples), or 0 for 10 % "
                f"(at most {MAX_AUTO_SIZE:,}); got {val_size}"
            )
        plan["train"] = (raw.train, pool[:-v], raw.train_labels)
        plan["val"] = (raw.train, pool[-v:], raw.train_labels)
    return {key: plan[key] for key in ("train", "val", "test")}


def raw_from_python(data: Any) -> RawSplits:
    """Arrays handed over from Python as a :class:`RawSplits`: a Tensor or ndarray ``(N, ...)`` (the
    training set), a dict with ``train`` and optionally ``val``, ``test`` and ``*_labels``, or a
    ``torch.utils.data.Dataset`` whose items are tensors/arrays or ``(x, label)`` pairs (read once into
    memory). Validation and splitting then follow the same rules as files."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(ARRAY_KEYS))
        if unknown or "train" not in data:
            raise RhovaeError(
                f"data dict needs 'train' and may hold {', '.join(ARRAY_KEYS[1:])}; got {sorted(data)}"
            )
        arrays = {k: _as_array(v, f"data[{k!r}]") for k, v in data.items()}
        return RawSplits(
            **arrays, source="arrays given to rhovae.fit", files={k: f"data[{k!r}]" for k in arrays}
        )
    if isinstance(data, (Tensor, np.ndarray)):
        return RawSplits(
            train=_as_array(data, "data"), source="an array given to rhovae.fit", files={"train": "data"}
        )
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise RhovaeError(
                "data: a Dataset given to rhovae.fit must have a length (a map-style Dataset)"
            ) from None
        if n == 0:
            raise RhovaeError("data: the Dataset is empty")
        xs, ys = [], []
        for i in range(n):
            item = data[i]
            if isinstance(item, (tuple, list)):
                xs.append(_as_array(item[0], f"data[{i}][0]"))
                ys.append(_label(item[1], i) if len(item) > 1 else -1)
            else:
                xs.append(_as_array(item, f"data[{i}]"))
        try:
            train = np.stack(xs)
        except ValueError:
            raise RhovaeError("data: the Dataset's items differ in shape; give items of one shape") from None
        labels = np.asarray(ys, dtype=np.int64) if len(ys) == n else None
        return RawSplits(
            train=train, train_labels=labels, source=f"a {type(data).__name__} given to rhovae.fit",
            files={"train": "data"},
        )  # fmt: skip
    raise RhovaeError(
        f"data must be a Tensor, an ndarray, a dict of arrays or a torch Dataset, got {type(data).__name__}"
    )


def _label(value: Any, i: int) -> int:
    """An item's label as an int (a Python or NumPy integer, or a one-element integer tensor)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise RhovaeError(
        f"data[{i}][1]: label {value!r:.40} is not an integer; a Dataset's items are x or (x, integer label)"
    )


def _as_array(x: Any, where: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise RhovaeError(f"{where}: not an array ({e})") from None
