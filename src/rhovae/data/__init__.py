"""Datasets: sources (IDX, npz/npy, image folders), validation, splits, pixel modes, batches.

::

    data = load_data("folder:~/pictures/cats", image_size=64)   # or "mnist", "npz:data.npz", ...
    for x in data.train_batches(128, shuffle=torch.Generator(), pixels=torch.Generator()):
        ...                                                      # x: (128, *data.data_shape), float
    model_input = data.preprocessing(pil_image)                  # raw inputs, prepared as training data

Modules: ``idx`` (the IDX format), ``images`` (Pillow), ``sources`` (one function per source, in a
registry), ``preprocessing`` (raw values → model input, serialisable), ``core`` (``load_data``,
:class:`Data`, in-memory and memory-mapped splits, batches), ``sequences`` (the sequence sets nas201,
layers and words, their vocabulary and one-hot encoding).
"""

from rhovae.data.core import (
    ArraySplit,
    Data,
    Split,
    auto_size,
    batch_bounds,
    batches,
    load_data,
    raw_from_python,
)
from rhovae.data.idx import IDX_FILES, read_idx, write_idx
from rhovae.data.preprocessing import PIXEL_MODES, Preprocessing
from rhovae.data.sources import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    PREFIX_SOURCES,
    RawSplits,
    SourceOptions,
    check_dataset_name,
    dataset_names,
)

__all__ = [
    "DATASETS",
    "batch_bounds",
    "DEBIAN_FASHION_MNIST",
    "IDX_FILES",
    "PIXEL_MODES",
    "PREFIX_SOURCES",
    "ArraySplit",
    "Data",
    "Preprocessing",
    "RawSplits",
    "SourceOptions",
    "Split",
    "auto_size",
    "batches",
    "check_dataset_name",
    "dataset_names",
    "load_data",
    "raw_from_python",
    "read_idx",
    "write_idx",
]
