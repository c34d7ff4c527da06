"""Every reader of a file a user hands to rhovae, fed arbitrary bytes and damaged valid files: it gives
data or one RhovaeError, never another exception (bounded hypothesis runs).

Readers: IDX (plain and .gz), npz/npy through the ``npz:`` source, image files through the ``folder:``
source (both all the way to training tensors, ``load_data``), TOML run configs (``load_config``),
experiments (``load_experiment`` and the grid it expands to), checkpoints (``load_checkpoint``, and
``load_run`` on a run folder).
"""

import gzip
import io
import itertools
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rhovae.config import RunConfig, load_config
from rhovae.data import load_data, read_idx, write_idx
from rhovae.errors import RhovaeError
from rhovae.experiments import load_experiment
from rhovae.runs import load_checkpoint, load_run
from rhovae.train import train

# RHOVAE_FUZZ=N: N times the examples, drawn afresh (a deeper search than the test suite's)
DEEPER = int(os.environ.get("RHOVAE_FUZZ", "0") or 0)
FUZZ = settings(
    max_examples=60 * max(1, DEEPER),
    deadline=None,
    derandomize=not DEEPER,  # the suite's run: the same examples every time, a failure is everyone's
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def more(n):
    """``n`` examples in the suite's run, scaled like the others by RHOVAE_FUZZ."""
    return settings(FUZZ, max_examples=n * max(1, DEEPER))


_counter = itertools.count()


def fresh(folder, name):
    """A new file path for each example (a memory map of the previous file stays valid)."""
    path = folder / f"{next(_counter)}-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def reads_or_refuses(read, *args, **kwargs):
    """The property: data, or a RhovaeError whose message is one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Pillow's DecompressionBombWarning
            return read(*args, **kwargs)
    except RhovaeError as e:
        assert "\n" not in str(e).strip(), str(e)
        return None


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """``valid`` cut short, or with a few bytes changed (flips anywhere, biased towards the header)."""
    if draw(st.booleans()):
        return valid[: draw(st.integers(0, len(valid) - 1))]
    out = bytearray(valid)
    for _ in range(draw(st.integers(1, 6))):
        limit = len(out) - 1 if draw(st.booleans()) else min(len(out) - 1, 64)
        out[draw(st.integers(0, limit))] = draw(st.integers(0, 255))
    return bytes(out)


# --- IDX -----------------------------------------------------------------------------------------------

_LABELS = np.arange(40, dtype=np.uint8) % 10
_IMAGES = (np.arange(5 * 6 * 7) % 256).astype(np.uint8).reshape(5, 6, 7)


def _idx(array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


VALID_IDX = [_idx(_LABELS), _idx(_IMAGES)]


@FUZZ
@given(
    raw=st.binary(max_size=300), form=st.sampled_from(["plain", "gzip of these bytes", "these bytes as .gz"])
)
def test_idx_from_arbitrary_bytes(tmp_path_factory, raw, form):
    path = fresh(tmp_path_factory.getbasetemp() / "idx", "x" if form == "plain" else "x.gz")
    path.write_bytes(gzip.compress(raw) if form == "gzip of these bytes" else raw)
    array = reads_or_refuses(read_idx, path)
    assert array is None or isinstance(array, np.ndarray)


@FUZZ
@given(data=st.data(), which=st.sampled_from([0, 1]), gz=st.booleans())
def test_idx_damaged(tmp_path_factory, data, which, gz):
    valid = VALID_IDX[which]
    raw = data.draw(damaged(gzip.compress(valid, mtime=0) if gz else valid))
    path = fresh(tmp_path_factory.getbasetemp() / "idx-damaged", "x.gz" if gz else "x")
    path.write_bytes(raw)
    array = reads_or_refuses(read_idx, path)
    if array is not None:
        assert array.size * array.itemsize <= len(valid)


def test_idx_roundtrip_still_works(tmp_path):
    for array in (_LABELS, _IMAGES, np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)):
        for name in ("a", "a.gz"):
            write_idx(tmp_path / name, array)
            assert np.array_equal(read_idx(tmp_path / name), array)


# --- npz / npy through the npz: source -----------------------------------------------------------------


def _saved(save, **arrays):
    buf = io.BytesIO()
    save(buf, **arrays)
    return buf.getvalue()


_TRAIN = (np.arange(20 * 16) % 256).astype(np.uint8).reshape(20, 4, 4)
VALID_ARRAYS = {
    "stored.npz": _saved(np.savez, train=_TRAIN, test=_TRAIN[:6], train_labels=np.arange(20) % 3),
    "compressed.npz": _saved(np.savez_compressed, train=_TRAIN.astype(np.float32) / 255),
    "x.npy": _saved(lambda f, a: np.save(f, a), a=_TRAIN),
}


def _load_npz(path):
    data = load_data(f"npz:{path}", val_size=0)
    assert data.train.shape[0] > 0 and torch.isfinite(data.train[:]).all()
    return data


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".npz", ".npy"]))
def test_npz_source_from_arbitrary_bytes(tmp_path_factory, raw, suffix):
    path = fresh(tmp_path_factory.getbasetemp() / "npz", f"x{suffix}")
    path.write_bytes(raw)
    reads_or_refuses(_load_npz, path)


@more(100)
@given(data=st.data(), name=st.sampled_from(sorted(VALID_ARRAYS)))
def test_npz_source_damaged(tmp_path_factory, data, name):
    path = fresh(tmp_path_factory.getbasetemp() / "npz-damaged", name)
    path.write_bytes(data.draw(damaged(VALID_ARRAYS[name])))
    reads_or_refuses(_load_npz, path)


# --- image files through the folder: source ------------------------------------------------------------


def _image(fmt, mode="L"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_TRAIN[0] if mode == "L" else np.stack([_TRAIN[0]] * 3, -1), mode).save(buf, format=fmt)
    return buf.getvalue()


VALID_IMAGES = {".png": _image("PNG"), ".gif": _image("GIF"), ".jpg": _image("JPEG", "RGB"),
                ".bmp": _image("BMP"), ".tif": _image("TIFF")}  # fmt: skip


def _load_folder(folder, raw, suffix):
    folder.mkdir()
    for i in range(4):  # three good images and the one under test
        (folder / f"{i}.png").write_bytes(VALID_IMAGES[".png"])
    (folder / f"x{suffix}").write_bytes(raw)
    data = load_data(f"folder:{folder}")
    assert data.data_shape[1:] == (4, 4)
    return data


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from(sorted(VALID_IMAGES)))
def test_folder_source_from_arbitrary_bytes(tmp_path_factory, raw, suffix):
    reads_or_refuses(_load_folder, fresh(tmp_path_factory.getbasetemp() / "images", "f"), raw, suffix)


@more(100)
@given(data=st.data(), suffix=st.sampled_from(sorted(VALID_IMAGES)))
def test_folder_source_damaged(tmp_path_factory, data, suffix):
    raw = data.draw(damaged(VALID_IMAGES[suffix]))
    reads_or_refuses(_load_folder, fresh(tmp_path_factory.getbasetemp() / "images-damaged", "f"), raw, suffix)


# --- TOML: run configs and experiments -----------------------------------------------------------------

FIELDS = sorted(RunConfig().to_dict())


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML's
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml(doc):
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["ar1", "diagonal", "mlp", "mnist", "auto", "npz:x.npz", "cpu", "meta", "iaf", "aid"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS + ["x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8)


@FUZZ
@given(doc=st.dictionaries(keys, values, max_size=6))
def test_run_configs(tmp_path_factory, doc):
    path = fresh(tmp_path_factory.getbasetemp() / "configs", "c.toml")
    path.write_text(toml(doc), encoding="utf-8")
    cfg = reads_or_refuses(load_config, path)
    if cfg is not None:
        reads_or_refuses(cfg.validate)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_run_configs_from_arbitrary_bytes(tmp_path_factory, raw):
    path = fresh(tmp_path_factory.getbasetemp() / "configs-raw", "c.toml")
    path.write_bytes(raw)
    reads_or_refuses(load_config, path)


def _expand(path):
    exp = load_experiment(path)
    return exp.points()


experiments = st.fixed_dictionaries(
    {},
    optional={
        "name": values,
        "description": values,
        "grid": st.dictionaries(st.sampled_from(["posterior", "seed", "latent_dim", "aid", "beta", "x"]),
                                st.lists(scalars, max_size=3) | values, max_size=3),
        "run": st.dictionaries(st.sampled_from(FIELDS[:12] + ["x"]), values, max_size=3),
        "evaluate": st.dictionaries(st.sampled_from(["iwae_k", "iwae_limit", "baseline", "x"]), values,
                                    max_size=3),
        "options": st.dictionaries(st.sampled_from(["aid", "x"]), values, max_size=2),
    },
)  # fmt: skip


@more(100)
@given(doc=experiments)
def test_experiments(tmp_path_factory, doc):
    path = fresh(tmp_path_factory.getbasetemp() / "experiments", "e.toml")
    path.write_text(toml(doc), encoding="utf-8")
    points = reads_or_refuses(_expand, path)
    assert points is None or all(isinstance(cfg, RunConfig) for _, cfg, _ in points)


@FUZZ
@given(data=st.data(), preset=st.sampled_from(["quick", "paper", "families"]))
def test_experiments_damaged(tmp_path_factory, data, preset):
    from importlib import resources

    text = resources.files("rhovae.presets").joinpath(f"{preset}.toml").read_bytes()
    path = fresh(tmp_path_factory.getbasetemp() / "experiments-damaged", "e.toml")
    path.write_bytes(data.draw(damaged(text)))
    reads_or_refuses(_expand, path)


# --- checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A trained run (one epoch of a tiny model on 40 random 4x4 images)."""
    folder = tmp_path_factory.mktemp("ckpt")
    np.save(folder / "x.npy", _TRAIN)
    cfg = RunConfig(dataset=f"npz:{folder / 'x.npy'}", latent_dim=2, hidden=8, epochs=1, batch_size=8,
                    device="cpu", pictures=False, val_size=2)  # fmt: skip
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(cfg, folder / "run", progress=False)
        finally:
            torch.set_num_threads(threads)
    return folder / "run"


@FUZZ
@given(raw=st.binary(max_size=300), resume=st.booleans())
def test_checkpoints_from_arbitrary_bytes(tmp_path_factory, raw, resume):
    path = fresh(tmp_path_factory.getbasetemp() / "ckpt-raw", "last.pt")
    path.write_bytes(raw)
    reads_or_refuses(load_checkpoint, path, resume=resume)


@more(100)
@given(data=st.data(), name=st.sampled_from(["last.pt", "best.pt"]))
def test_checkpoints_damaged(tmp_path_factory, run_folder, data, name):
    raw = data.draw(damaged((run_folder / name).read_bytes()))
    path = fresh(tmp_path_factory.getbasetemp() / "ckpt-damaged", name)
    path.write_bytes(raw)
    ckpt = reads_or_refuses(load_checkpoint, path, resume=name == "last.pt")
    assert ckpt is None or (isinstance(ckpt["epoch"], int) and isinstance(ckpt["model"], dict))


entries = st.recursive(
    scalars | st.builds(lambda shape: torch.zeros(shape), st.lists(st.integers(0, 3), max_size=3)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


@more(80)
@given(data=st.data())
def test_runs_whose_checkpoint_holds_odd_values(tmp_path_factory, run_folder, data):
    """A loadable checkpoint with entries removed or replaced (at the top or one level down, e.g. in
    its config or preprocessing record): load_run gives a model or one RhovaeError."""
    ckpt = torch.load(run_folder / "best.pt", weights_only=True)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(ckpt)))
        inner = ckpt[key]
        if isinstance(inner, dict) and inner and data.draw(st.booleans()):
            sub = data.draw(st.sampled_from(sorted(inner)))
            if data.draw(st.booleans()):
                del inner[sub]
            else:
                inner[sub] = data.draw(entries)
        elif data.draw(st.booleans()):
            del ckpt[key]
        else:
            ckpt[key] = data.draw(entries)
    folder = fresh(tmp_path_factory.getbasetemp() / "runs-odd", "run")
    folder.mkdir()
    torch.save(ckpt, folder / "best.pt")
    reads_or_refuses(load_run, folder, "best", "cpu")


@more(40)
@given(data=st.data())
def test_runs_with_a_damaged_best_checkpoint(tmp_path_factory, run_folder, data):
    """load_run builds the model too: a damaged file still ends in data or one RhovaeError."""
    folder = fresh(tmp_path_factory.getbasetemp() / "runs-damaged", "run")
    folder.mkdir()
    (folder / "config.toml").write_bytes((run_folder / "config.toml").read_bytes())
    (folder / "best.pt").write_bytes(data.draw(damaged((run_folder / "best.pt").read_bytes())))
    reads_or_refuses(load_run, folder, "best", "cpu")
