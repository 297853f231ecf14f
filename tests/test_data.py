"""Tests of ddpm_engine.data: every source, the split, the cache and each user-facing error."""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_engine import data as data_module
from ddpm_engine.config import DataConfig
from ddpm_engine.data import DataError, ImageData, load_data


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_data(DataConfig(name="digits"))


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _grey(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    return Image.fromarray(pixels, mode="L")


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    """Five same-size RGB images: PNG, JPEG with upper-case suffix, and a nested subfolder."""
    folder = tmp_path / "faces"
    (folder / "nested" / "deeper").mkdir(parents=True)
    _rgb(12, 12, 0).save(folder / "a.png")
    _rgb(12, 12, 1).save(folder / "b.JPG")
    _rgb(12, 12, 2).save(folder / "nested" / "c.jpeg")
    _rgb(12, 12, 3).save(folder / "nested" / "deeper" / "d.png")
    _rgb(12, 12, 4).convert("RGBA").save(folder / "e.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _folder_config(folder: Path, cache_dir: Path, **kwargs) -> DataConfig:
    return DataConfig(name="image_folder", path=str(folder), cache_dir=str(cache_dir), **kwargs)


# --- digits ---


def test_digits_shape_dtype_levels_and_labels(digits: ImageData) -> None:
    assert digits.name == "digits"
    assert digits.levels == 17
    assert digits.train.dtype == torch.uint8 and digits.heldout.dtype == torch.uint8
    assert digits.train.shape[1:] == (1, 8, 8)
    assert (digits.channels, digits.image_size) == (1, 8)
    everything = torch.cat([digits.train, digits.heldout])
    assert int(everything.max()) == 16 and int(everything.min()) == 0
    assert digits.train.shape[0] + digits.heldout.shape[0] == 1797
    assert digits.heldout.shape[0] == round(1797 * 0.1)
    assert digits.train_labels.dtype == torch.int64
    assert digits.train_labels.shape[0] == digits.train.shape[0]
    assert digits.heldout_labels.shape[0] == digits.heldout.shape[0]
    assert set(torch.cat([digits.train_labels, digits.heldout_labels]).tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_follows_split_seed(digits: ImageData) -> None:
    again = load_data(DataConfig(name="digits"))
    assert torch.equal(digits.train, again.train)
    assert torch.equal(digits.heldout, again.heldout)
    assert torch.equal(digits.heldout_labels, again.heldout_labels)
    other = load_data(DataConfig(name="digits", split_seed=1))
    assert not torch.equal(digits.heldout, other.heldout)
    assert other.train.shape[0] + other.heldout.shape[0] == 1797


def test_digits_resized_keeps_17_levels() -> None:
    resized = load_data(DataConfig(name="digits", image_size=16))
    assert resized.train.shape[1:] == (1, 16, 16)
    assert resized.levels == 17
    values = set(torch.unique(torch.cat([resized.train, resized.heldout])).tolist())
    assert values <= set(range(17))
    assert len(values) > 10  # interpolation did not collapse the grey levels


def test_digits_three_channels_repeat_grey() -> None:
    colour = load_data(DataConfig(name="digits", channels=3))
    assert colour.train.shape[1:] == (3, 8, 8)
    assert torch.equal(colour.train[:, 0], colour.train[:, 2])


def test_model_space_range_and_round_trip(digits: ImageData) -> None:
    x = digits.to_model_space(digits.train)
    assert x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(digits.from_model_space(x), digits.train)
    # Out-of-range and NaN samples still map to valid levels.
    wild = torch.tensor([-3.0, 3.0, float("nan"), 0.01])
    assert digits.from_model_space(wild).tolist() == [0, 16, 8, 8]


def test_max_images_and_levels_override() -> None:
    small = load_data(DataConfig(name="digits", max_images=50, heldout_fraction=0.2))
    assert (small.train.shape[0], small.heldout.shape[0]) == (40, 10)
    assert small.train_labels.shape[0] == 40
    same = load_data(DataConfig(name="digits", max_images=50, heldout_fraction=0.2))
    assert torch.equal(small.train, same.train)
    binary = load_data(DataConfig(name="digits", levels=2))
    assert binary.levels == 2
    assert set(torch.unique(binary.train).tolist()) == {0, 1}


def test_max_images_beyond_the_digits_is_an_error_naming_the_key() -> None:
    """The cap counts every image the source holds before the split (the digits: 1,797). A cap
    above it used to load every image silently: a data-set-size study would have trained two
    'sizes' on the same data."""
    every = load_data(DataConfig(name="digits", max_images=1797))
    assert every.train.shape[0] + every.heldout.shape[0] == 1797
    with pytest.raises(DataError, match="1,798 images asked for, but there are 1,797 in digits") as caught:
        load_data(DataConfig(name="digits", max_images=1798))
    assert caught.value.key == "data.max_images"


def test_split_keeps_one_image_on_each_side() -> None:
    tiny = load_data(DataConfig(name="digits", max_images=2, heldout_fraction=0.01))
    assert (tiny.train.shape[0], tiny.heldout.shape[0]) == (1, 1)


# --- image folders ---


def test_image_folder_native(rgb_folder: Path, cache_dir: Path) -> None:
    loaded = load_data(_folder_config(rgb_folder, cache_dir, heldout_fraction=0.2))
    assert loaded.name == "image_folder:faces"
    assert loaded.levels == 256
    assert loaded.train.shape == (4, 3, 12, 12)
    assert loaded.heldout.shape == (1, 3, 12, 12)
    assert loaded.train_labels is None and loaded.heldout_labels is None
    # The PNGs are lossless, so the loaded pixels include a.png exactly.
    a_png = torch.from_numpy(np.array(_rgb(12, 12, 0))).permute(2, 0, 1)
    everything = torch.cat([loaded.train, loaded.heldout])
    assert any(torch.equal(image, a_png) for image in everything)


def test_max_images_beyond_an_image_folder_is_an_error(rgb_folder: Path, cache_dir: Path) -> None:
    """An image folder's size is its count of images (five here)."""
    loaded = load_data(_folder_config(rgb_folder, cache_dir, max_images=5))
    assert loaded.train.shape[0] + loaded.heldout.shape[0] == 5
    with pytest.raises(DataError, match="6 images asked for, but there are 5 in image_folder:faces") as caught:
        load_data(_folder_config(rgb_folder, cache_dir, max_images=6))
    assert caught.value.key == "data.max_images"


def test_image_folder_resize_and_grey(rgb_folder: Path, cache_dir: Path) -> None:
    _rgb(30, 20, 5).save(rgb_folder / "nested" / "wide.png")  # center-cropped to square
    _grey(9, 9, 6).save(rgb_folder / "grey.png")
    loaded = load_data(_folder_config(rgb_folder, cache_dir, image_size=8, channels=1))
    assert loaded.train.shape[1:] == (1, 8, 8)
    assert loaded.train.shape[0] + loaded.heldout.shape[0] == 7
    colour = load_data(_folder_config(rgb_folder, cache_dir, image_size=6, channels=3))
    assert colour.train.shape[1:] == (3, 6, 6)


def test_image_folder_grey_only_keeps_one_channel(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(3):
        _grey(10, 10, i).save(folder / f"{i}.png")
    _grey(10, 10, 9).convert("LA").save(folder / "alpha.png")
    loaded = load_data(_folder_config(folder, cache_dir))
    assert loaded.train.shape[1:] == (1, 10, 10)


def test_image_folder_cache_is_written_and_reused(rgb_folder: Path, cache_dir: Path, monkeypatch) -> None:
    config = _folder_config(rgb_folder, cache_dir, image_size=8)
    first = load_data(config)
    cache_files = list(cache_dir.glob("*.npy"))
    assert len(cache_files) == 1
    assert not list(cache_dir.glob("*.tmp"))
    mtime = cache_files[0].stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached folder was decoded again")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_data(config)
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.heldout, second.heldout)
    assert cache_files[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # A different size is a different cache entry.
    load_data(_folder_config(rgb_folder, cache_dir, image_size=4))
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_image_folder_cache_notices_changed_files(rgb_folder: Path, cache_dir: Path) -> None:
    config = _folder_config(rgb_folder, cache_dir)
    before = load_data(config)
    _rgb(12, 12, 99).save(rgb_folder / "new.png")
    after = load_data(config)
    count = lambda loaded: loaded.train.shape[0] + loaded.heldout.shape[0]  # noqa: E731
    assert count(after) == count(before) + 1


def test_image_folder_cache_dir_from_environment(rgb_folder: Path, tmp_path: Path, monkeypatch) -> None:
    env_cache = tmp_path / "env_cache"
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(env_cache))
    load_data(DataConfig(name="image_folder", path=str(rgb_folder)))
    assert len(list(env_cache.glob("*.npy"))) == 1


def test_image_folder_corrupt_cache_is_rebuilt(rgb_folder: Path, cache_dir: Path) -> None:
    config = _folder_config(rgb_folder, cache_dir)
    first = load_data(config)
    cache_file = next(cache_dir.glob("*.npy"))
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="cache"):
        second = load_data(config)
    assert torch.equal(first.train, second.train)


def test_image_folder_missing_path(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_data(_folder_config(missing, cache_dir))


def test_image_folder_path_required() -> None:
    with pytest.raises(DataError, match="data.path"):
        load_data(DataConfig(name="image_folder"))


def test_image_folder_not_a_directory(tmp_path: Path, cache_dir: Path) -> None:
    file = tmp_path / "single.png"
    _rgb(4, 4, 0).save(file)
    with pytest.raises(DataError, match="single.png"):
        load_data(_folder_config(file, cache_dir))


def test_image_folder_without_images(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty_folder"):
        load_data(_folder_config(folder, cache_dir))


def test_image_folder_corrupt_image(rgb_folder: Path, cache_dir: Path) -> None:
    (rgb_folder / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_data(_folder_config(rgb_folder, cache_dir))


def test_image_folder_truncated_image(rgb_folder: Path, cache_dir: Path) -> None:
    whole = rgb_folder / "a.png"
    (rgb_folder / "truncated.png").write_bytes(whole.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        load_data(_folder_config(rgb_folder, cache_dir))


def test_image_folder_mixed_channels(rgb_folder: Path, cache_dir: Path) -> None:
    _grey(12, 12, 7).save(rgb_folder / "grey.png")
    with pytest.raises(DataError, match="data.channels") as info:
        load_data(_folder_config(rgb_folder, cache_dir))
    assert "grey.png" in str(info.value) and "a.png" in str(info.value)


def test_image_folder_mixed_sizes(rgb_folder: Path, cache_dir: Path) -> None:
    _rgb(16, 16, 8).save(rgb_folder / "big.png")
    with pytest.raises(DataError, match="data.image_size") as info:
        load_data(_folder_config(rgb_folder, cache_dir))
    assert "big.png" in str(info.value)


def test_image_folder_not_square_needs_image_size(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(2):
        _rgb(10, 6, i).save(folder / f"{i}.png")
    with pytest.raises(DataError, match="data.image_size"):
        load_data(_folder_config(folder, cache_dir))
    assert load_data(_folder_config(folder, cache_dir, image_size=6)).train.shape[1:] == (3, 6, 6)


# --- npz ---


def _save_npz(tmp_path: Path, name: str = "arrays.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _npz_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="npz", path=str(path), **kwargs)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((6, 8, 8), (1, 8, 8)),
        ((6, 8, 8, 1), (1, 8, 8)),
        ((6, 8, 8, 3), (3, 8, 8)),
        ((6, 3, 8, 8), (3, 8, 8)),
        ((6, 1, 8, 8), (1, 8, 8)),
    ],
)
def test_npz_layouts(tmp_path: Path, shape, expected) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    loaded = load_data(_npz_config(_save_npz(tmp_path, images=pixels)))
    assert loaded.train.shape[1:] == expected
    assert loaded.levels == 256
    assert loaded.train.shape[0] + loaded.heldout.shape[0] == 6


def test_npz_nhwc_values_are_transposed_not_scrambled(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 5, 5, 3), dtype=np.uint8)
    loaded = load_data(_npz_config(_save_npz(tmp_path, images=pixels), heldout_fraction=0.25))
    everything = torch.cat([loaded.train, loaded.heldout]).permute(0, 2, 3, 1).numpy()
    assert sorted(map(bytes, everything)) == sorted(map(bytes, pixels))


def test_npz_dtypes(tmp_path: Path) -> None:
    ints = np.arange(4 * 8 * 8, dtype=np.int64).reshape(4, 8, 8) % 200
    loaded = load_data(_npz_config(_save_npz(tmp_path, "ints.npz", x=ints)))
    assert int(torch.cat([loaded.train, loaded.heldout]).max()) == 199 and loaded.levels == 256

    unit = np.linspace(0.0, 1.0, 4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    loaded = load_data(_npz_config(_save_npz(tmp_path, "unit.npz", x=unit)))
    values = torch.cat([loaded.train, loaded.heldout])
    assert (int(values.min()), int(values.max())) == (0, 255)

    signed = unit * 2 - 1
    loaded_signed = load_data(_npz_config(_save_npz(tmp_path, "signed.npz", x=signed)))
    assert torch.equal(loaded_signed.train, loaded.train)

    with pytest.raises(DataError, match="wide.npz"):
        load_data(_npz_config(_save_npz(tmp_path, "wide.npz", x=unit * 255)))
    with pytest.raises(DataError, match="big.npz"):
        load_data(_npz_config(_save_npz(tmp_path, "big.npz", x=ints + 1000)))
    with pytest.raises(DataError, match="nan.npz"):
        load_data(_npz_config(_save_npz(tmp_path, "nan.npz", x=unit * np.nan)))


def test_npz_levels_declared_by_config(tmp_path: Path) -> None:
    digits_like = np.random.default_rng(2).integers(0, 17, size=(10, 8, 8), dtype=np.uint8)
    path = _save_npz(tmp_path, images=digits_like)
    loaded = load_data(_npz_config(path, levels=17))
    assert loaded.levels == 17
    assert torch.equal(
        torch.cat([loaded.train, loaded.heldout]).sort(0).values,
        torch.from_numpy(digits_like).unsqueeze(1).sort(0).values,
    )
    with pytest.raises(DataError, match="data.levels"):
        load_data(_npz_config(path, levels=4))
    unit = np.linspace(0, 1, 10 * 16).reshape(10, 4, 4)
    quantized = load_data(_npz_config(_save_npz(tmp_path, "unit.npz", x=unit), levels=5))
    assert set(torch.unique(quantized.train).tolist()) <= set(range(5))


def test_npz_key_and_labels(tmp_path: Path) -> None:
    first = np.zeros((5, 4, 4), dtype=np.uint8)
    second = np.full((5, 4, 4), 7, dtype=np.uint8)
    path = _save_npz(tmp_path, first=first, second=second, labels=np.arange(5))
    default = load_data(_npz_config(path))
    assert int(default.train.max()) == 0  # None takes the first array
    keyed = load_data(_npz_config(path, npz_key="second"))
    assert int(keyed.train.min()) == 7
    assert keyed.train_labels.dtype == torch.int64
    assert sorted(torch.cat([keyed.train_labels, keyed.heldout_labels]).tolist()) == list(range(5))

    y_path = _save_npz(tmp_path, "y.npz", x=first, y=np.arange(3))
    with pytest.warns(UserWarning, match="labels"):
        unmatched = load_data(_npz_config(y_path))
    assert unmatched.train_labels is None


def test_npz_channel_conversion_and_resize(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 10, 10, 3), dtype=np.uint8)
    loaded = load_data(_npz_config(_save_npz(tmp_path, x=pixels), channels=1, image_size=5))
    assert loaded.train.shape[1:] == (1, 5, 5)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.npz"):
        load_data(_npz_config(tmp_path / "missing.npz"))
    path = _save_npz(tmp_path, images=np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="images") as info:
        load_data(_npz_config(path, npz_key="pixels"))
    assert "pixels" in str(info.value) and "arrays.npz" in str(info.value)
    bad = _save_npz(tmp_path, "bad.npz", x=np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="bad.npz"):
        load_data(_npz_config(bad))
    five = _save_npz(tmp_path, "five.npz", x=np.zeros((3, 5, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="five.npz"):
        load_data(_npz_config(five))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_data(_npz_config(junk))


# --- torchvision ---


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_missing_is_a_data_error(tmp_path: Path) -> None:
    config = DataConfig(name="torchvision", torchvision_set="MNIST", path=str(tmp_path))
    with pytest.raises(DataError, match="torchvision"):
        load_data(config)


def _fake_torchvision(monkeypatch, dataset_cls) -> None:
    """Installs a stand-in torchvision package so the adapter is tested without it."""
    package = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.FakeSet = dataset_cls
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_torchvision_adapter_with_array_attribute(tmp_path: Path, monkeypatch) -> None:
    class FakeSet:
        def __init__(self, root, train=True, download=False, transform=None):
            assert train is True and download is False
            if not os.path.isdir(os.path.join(root, "FakeSet")):
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            self.data = torch.randint(0, 256, (10, 6, 6), dtype=torch.uint8)
            self.targets = torch.arange(10)

    _fake_torchvision(monkeypatch, FakeSet)
    config = DataConfig(name="torchvision", torchvision_set="FakeSet", path=str(tmp_path), channels=3)
    with pytest.raises(DataError, match="download"):
        load_data(config)
    (tmp_path / "FakeSet").mkdir()
    loaded = load_data(config)
    assert loaded.name == "torchvision:FakeSet"
    assert loaded.train.shape[1:] == (3, 6, 6) and loaded.levels == 256
    assert loaded.train_labels.shape[0] == loaded.train.shape[0]
    with pytest.raises(DataError, match="Nope"):
        load_data(DataConfig(name="torchvision", torchvision_set="Nope", path=str(tmp_path)))


def test_torchvision_adapter_iterating_pil_images(tmp_path: Path, monkeypatch) -> None:
    class FakeSet:
        def __init__(self, root, split="train", download=False):
            assert split == "train"

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return _rgb(8, 8, index), index % 2

    _fake_torchvision(monkeypatch, FakeSet)
    config = DataConfig(name="torchvision", torchvision_set="FakeSet", path=str(tmp_path))
    loaded = load_data(config)
    assert loaded.train.shape[1:] == (3, 8, 8)
    assert sorted(torch.cat([loaded.train_labels, loaded.heldout_labels]).tolist()) == [0, 0, 1, 1]


def test_image_data_repr_is_short(digits: ImageData) -> None:
    text = repr(digits)
    assert "levels=17" in text and len(text) < 200


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)
    assert data_module.MAX_LEVELS == 256


def test_levels_beyond_uint8_are_refused() -> None:
    with pytest.raises(DataError, match="data.levels"):
        load_data(DataConfig(name="digits", levels=1024))


def test_atomic_write_replaces_whole_files_with_the_umask_permissions(tmp_path):
    """Results on a shared cluster folder must be readable by the group: the written file
    takes the process umask (mkstemp alone makes 0600); a failed write leaves the old file."""
    import os

    from ddpm_engine.files import atomic_write

    target = tmp_path / "sub" / "table.bin"
    old = os.umask(0o002)
    try:
        atomic_write(target, lambda tmp: open(tmp, "w").write("first"))
    finally:
        os.umask(old)
    assert target.read_text() == "first" and (target.stat().st_mode & 0o777) == 0o664

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["table.bin"]


def test_describe_split_names_the_training_split_by_a_stable_digest(digits, tmp_path):
    """The digest MLflow groups runs by: fixed for a given split (pinned, so a change to what
    enters it is a decision, not an accident), different for another split of the same data."""
    from ddpm_engine.data import data_source, describe_split

    row = describe_split(digits, DataConfig(name="digits"))
    assert row == {
        "name": "digits",
        "digest": "61329adeba2160b4",
        "source": "sklearn.datasets.load_digits",
        "train_images": 1617,
        "heldout_images": 180,
        "channels": 1,
        "image_size": 8,
        "levels": 17,
    }
    for other in (DataConfig(split_seed=1), DataConfig(heldout_fraction=0.2), DataConfig(max_images=1000)):
        assert describe_split(load_data(other), other)["digest"] != row["digest"], other
    folder = DataConfig(name="image_folder", path=str(tmp_path / "faces" / ".." / "faces"))
    assert data_source(folder) == str((tmp_path / "faces").resolve())
    assert data_source(DataConfig(name="torchvision", torchvision_set="MNIST", path=str(tmp_path))) == (
        f"torchvision.datasets.MNIST:{tmp_path.resolve()}"
    )


# --- IDX files (MNIST, Fashion-MNIST) ---

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REQUIRE_SERVERS = os.environ.get("DDPM_ABLATE_REQUIRE_SERVERS") == "1"


def _write_idx(file: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """The IDX layout written by hand (magic, big-endian uint32 sizes, big-endian data), so the
    reader is checked against the format, not against itself."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    file.write_bytes(gzip.compress(payload) if file.suffix == ".gz" else payload)
    return file


def _idx_images(count: int, side: int, first: int) -> np.ndarray:
    """Distinct images: image i carries its number in pixel (0, 0), the rest is noise."""
    images = np.random.default_rng(first).integers(0, 256, size=(count, side, side), dtype=np.uint8)
    images[:, 0, 0] = np.arange(first, first + count) % 256
    return images


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """A 12-train / 4-test MNIST-shaped set of 6x6 images; plain and gzipped files mixed."""
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", _idx_images(12, 6, 0))
    _write_idx(folder / "train-labels-idx1-ubyte", (np.arange(12) % 10).astype(np.uint8))
    _write_idx(folder / "t10k-images-idx3-ubyte", _idx_images(4, 6, 100))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1], dtype=np.uint8))
    return folder


def _by_first_pixel(images: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    order = images[:, 0, 0, 0].argsort()
    return images[order, 0].numpy(), labels[order].numpy()


@pytest.mark.parametrize("name", ["gz", "plain"])
@pytest.mark.parametrize(
    "array, type_code",
    [
        (np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5), 0x08),
        (np.array([7, 0, 255], dtype=np.uint8), 0x08),
        (np.array([[-70000, 3], [1, 2**30]], dtype=np.int32), 0x0C),
        (np.array([0.5, -2.25], dtype=np.float32), 0x0D),
    ],
)
def test_read_idx_reads_back_exactly(tmp_path: Path, name, array, type_code) -> None:
    file = _write_idx(tmp_path / ("a.gz" if name == "gz" else "a"), array, type_code)
    got = data_module.read_idx(file)
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_idx_split_is_the_files_split(idx_folder: Path) -> None:
    for fraction in (0.1, 0.75):  # heldout_fraction does not apply: the t10k files are held out
        data = load_data(DataConfig(name="mnist", path=str(idx_folder), heldout_fraction=fraction))
        assert data.name == "mnist" and data.levels == 256
        assert data.train.shape == (12, 1, 6, 6) and data.heldout.shape == (4, 1, 6, 6)
        train, train_labels = _by_first_pixel(data.train, data.train_labels)
        np.testing.assert_array_equal(train, _idx_images(12, 6, 0))
        np.testing.assert_array_equal(train_labels, np.arange(12) % 10)
        held, held_labels = _by_first_pixel(data.heldout, data.heldout_labels)
        np.testing.assert_array_equal(held, _idx_images(4, 6, 100))
        np.testing.assert_array_equal(held_labels, [3, 1, 4, 1])


def test_idx_parts_are_shuffled_by_split_seed(idx_folder: Path) -> None:
    """Each part is in a seeded random order, so that a prefix (the probe's held-out images)
    is a random sample and not, as in MNIST's test file, the easier half."""
    first = load_data(DataConfig(name="mnist", path=str(idx_folder)))
    again = load_data(DataConfig(name="mnist", path=str(idx_folder)))
    other = load_data(DataConfig(name="mnist", path=str(idx_folder), split_seed=3))
    assert torch.equal(first.train, again.train) and torch.equal(first.heldout, again.heldout)
    assert not torch.equal(first.train, other.train)
    assert first.train[:, 0, 0, 0].tolist() != list(range(12))


def test_idx_max_images_caps_each_part_by_its_share(idx_folder: Path) -> None:
    data = load_data(DataConfig(name="mnist", path=str(idx_folder), max_images=8))
    # 4 of 16 images are held out: 8 images keep 2 of them and 6 training images
    assert (data.train.shape[0], data.heldout.shape[0]) == (6, 2)
    assert set(data.heldout[:, 0, 0, 0].tolist()) <= set(range(100, 104))
    assert set(data.train[:, 0, 0, 0].tolist()) <= set(range(12))
    assert data.train_labels.tolist() == [i % 10 for i in data.train[:, 0, 0, 0].tolist()]


def test_idx_max_images_beyond_both_files_together_is_an_error(idx_folder: Path) -> None:
    """For the IDX sets the cap covers both files (16 images here; Fashion-MNIST: 70,000)."""
    assert load_data(DataConfig(name="mnist", path=str(idx_folder), max_images=16)).train.shape[0] == 12
    with pytest.raises(DataError, match="17 images asked for, but there are 16 in the MNIST files") as caught:
        load_data(DataConfig(name="mnist", path=str(idx_folder), max_images=17))
    assert caught.value.key == "data.max_images"


def test_idx_resize_levels_and_channels(idx_folder: Path) -> None:
    data = load_data(DataConfig(name="mnist", path=str(idx_folder), image_size=4, levels=32, channels=3))
    assert data.train.shape == (12, 3, 4, 4) and data.levels == 32
    assert int(data.train.max()) <= 31


def test_idx_digest_covers_what_defines_the_split(idx_folder: Path) -> None:
    from ddpm_engine.data import describe_split

    def digest(**kwargs) -> str:
        config = DataConfig(name="mnist", path=str(idx_folder), **kwargs)
        return describe_split(load_data(config), config)["digest"]

    base = digest()
    assert digest(heldout_fraction=0.5) == base  # the same split: no new digest
    assert digest(split_seed=1) != base
    assert digest(max_images=8) != base


def test_idx_missing_files_say_how_to_get_them(tmp_path: Path, idx_folder: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as caught:
        load_data(DataConfig(name="fashion_mnist", path=str(tmp_path / "nowhere")))
    assert "\n" not in str(caught.value) and str(tmp_path / "nowhere") in str(caught.value)
    with pytest.raises(DataError, match="data.path is required"):
        load_data(DataConfig(name="mnist"))
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data(DataConfig(name="mnist", path=str(idx_folder)))


def test_idx_fashion_mnist_defaults_to_the_debian_folder() -> None:
    assert data_module.data_source(DataConfig(name="fashion_mnist")) == str(FASHION_MNIST.resolve())


def test_idx_bad_magic_names_the_file(idx_folder: Path) -> None:
    file = idx_folder / "t10k-images-idx3-ubyte"
    file.write_bytes(b"\x00\x01\x08\x03" + file.read_bytes()[4:])
    with pytest.raises(DataError, match=f"{file} is not an IDX file"):
        load_data(DataConfig(name="mnist", path=str(idx_folder)))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_file_names_the_file(idx_folder: Path, gz: bool) -> None:
    file = idx_folder / ("train-images-idx3-ubyte.gz" if gz else "t10k-images-idx3-ubyte")
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(DataError, match=f"{file} is truncated"):
        load_data(DataConfig(name="mnist", path=str(idx_folder)))


def test_idx_labels_must_match_the_images(idx_folder: Path) -> None:
    _write_idx(idx_folder / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3], dtype=np.uint8))
    with pytest.raises(DataError, match="3 labels for the 4 images"):
        load_data(DataConfig(name="mnist", path=str(idx_folder)))


def test_idx_problems_use_the_loaded_split() -> None:
    """A large heldout_fraction does not shrink a set that brings its own split."""
    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.shapes import problems

    config = ExperimentConfig(data=DataConfig(name="mnist", path="x", heldout_fraction=0.9))
    assert problems(config, 5, 28, heldout=1) == []
    assert [key for key, _ in problems(config, 5, 28)] == ["data.heldout_fraction"]


def test_real_fashion_mnist_loads_with_its_split() -> None:
    if not FASHION_MNIST.is_dir():
        if REQUIRE_SERVERS:
            pytest.fail(
                f"{FASHION_MNIST} is missing (DDPM_ABLATE_REQUIRE_SERVERS=1): apt-get install dataset-fashion-mnist"
            )
        pytest.skip(f"{FASHION_MNIST} is absent (apt-get install dataset-fashion-mnist)")
    data = load_data(DataConfig(name="fashion_mnist"))
    assert data.train.shape == (60_000, 1, 28, 28) and data.heldout.shape == (10_000, 1, 28, 28)
    assert data.levels == 256 and int(data.train.max()) == 255 and int(data.train.min()) == 0
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.heldout_labels).tolist() == [1000] * 10
