"""Image data sets as uint8 tensors with a fixed train / held-out split.

Every source (embedded digits, a folder of images, an array file, IDX files of MNIST or
Fashion-MNIST, a torchvision set) ends
as an `ImageData`: uint8 N x C x H x W tensors whose values are quantization levels
0..levels-1. Keeping uint8 rather than float keeps large sets (CelebA at 64x64) in memory;
the model sees `to_model_space` of a batch. The number of levels is part of the data
because the discretized decoder (L_0) and bits/dim depend on it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import json
import math
import os
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_engine.config import DataConfig
from ddpm_engine.files import atomic_write
from ddpm_engine.shapes import MAX_LEVELS, cap_problem, split_sizes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Bump when decoding changes, so caches written by an older decoder are not reused.
_CACHE_FORMAT = 1
# Below this many files a progress bar is noise.
_PROGRESS_MIN_FILES = 500
# Resizing in chunks bounds the float copy of a large array.
_RESIZE_CHUNK = 1024
# ITU-R 601-2 luma, the weights PIL uses for RGB -> L, so every source greys the same way.
_LUMA = (0.299, 0.587, 0.114)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}


class DataError(ValueError):
    """A problem with the user's data or data config, explained in one sentence. ``key``: the
    config key to blame when it is not where the data are (e.g. data.max_images), so the
    harness names it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, eq=False, repr=False)
class ImageData:
    """Train and held-out images as uint8 N x C x H x W tensors of levels 0..levels-1."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    levels: int
    train_labels: torch.Tensor | None = None
    heldout_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for part in (self.train, self.heldout):
            if part.dtype != torch.uint8 or part.dim() != 4:
                raise DataError("ImageData images must be uint8 tensors of shape N x C x H x W.")
        if self.train.shape[1:] != self.heldout.shape[1:]:
            raise DataError("ImageData train and held-out images must share C x H x W.")
        if not 2 <= self.levels <= MAX_LEVELS:
            raise DataError(f"ImageData levels must be in 2..{MAX_LEVELS}, got {self.levels}.")

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.shape[-1])

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels -> float32 in [-1, 1] (level 0 -> -1, level levels-1 -> 1)."""
        return x.to(torch.float32) / (self.levels - 1) * 2.0 - 1.0

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """float in model space -> nearest uint8 level, clamped to 0..levels-1."""
        # A diverged sampler can produce NaN; mid-grey is visible and keeps the cast defined.
        x = torch.nan_to_num(x.to(torch.float32), nan=0.0)
        scaled = ((x + 1.0) / 2.0 * (self.levels - 1)).round()
        return scaled.clamp(0, self.levels - 1).to(torch.uint8)

    def __repr__(self) -> str:
        labels = "with labels" if self.train_labels is not None else "no labels"
        return (
            f"ImageData(name={self.name!r}, train={tuple(self.train.shape)}, "
            f"heldout={tuple(self.heldout.shape)}, levels={self.levels}, {labels})"
        )


def load_data(config: DataConfig) -> ImageData:
    """Load, convert and split the data set that `config` describes."""
    if config.levels is not None and config.levels > MAX_LEVELS:
        raise DataError(
            f"data.levels={config.levels} exceeds {MAX_LEVELS}, the most uint8 storage holds; lower data.levels."
        )
    if config.name in IDX_SETS:
        return _load_idx(config)
    loaders = {
        "digits": _load_digits,
        "image_folder": _load_image_folder,
        "npz": _load_npz,
        "torchvision": _load_torchvision,
    }
    images, labels, levels, name = loaders[config.name](config)
    images, levels = _apply_levels(images, levels, config)
    too_many = cap_problem(config.max_images, images.shape[0], name)
    if too_many:
        raise DataError(too_many, key="data.max_images")
    if config.max_images is not None and config.max_images < images.shape[0]:
        keep = torch.randperm(images.shape[0], generator=_generator(config.split_seed))
        keep = keep[: config.max_images].sort().values
        images, labels = images[keep], None if labels is None else labels[keep]
    return _split(images, labels, levels, name, config)


def _apply_levels(images: torch.Tensor, levels: int, config: DataConfig) -> tuple[torch.Tensor, int]:
    # Sources with known levels are re-quantized (e.g. 8-bit faces to 32 levels); npz arrays
    # have no known levels, so there data.levels already declared them and this is a no-op.
    if config.levels is not None and config.levels != levels:
        return _requantize(images, levels, config.levels), config.levels
    return images, levels


# --- what a run trained on, for whoever tracks it (the `dataset` table) ---

# Bump when what enters the digest changes, so old and new digests never collide.
_DIGEST_VERSION = 1


def data_source(config: DataConfig) -> str:
    """Where the images come from: the loader of embedded data, else the resolved path."""
    if config.name == "digits":
        return "sklearn.datasets.load_digits"
    path = config.path or (IDX_SETS[config.name].default_path if config.name in IDX_SETS else None)
    path = str(Path(path).expanduser().resolve()) if path else ""
    if config.name == "torchvision":
        return f"torchvision.datasets.{config.torchvision_set}:{path}"
    return path


def split_digest(data: ImageData, config: DataConfig) -> str:
    """16 hex of a sha256 over the training split: its images (shape, levels, every byte) and
    the split definition (held-out fraction, split seed, image cap), so equal digests mean the
    same training images split the same way. About 1 s per GB of images.

    IDX sets keep their files' own train / test split, so heldout_fraction defines nothing
    there and is left out (two configs that differ only in it get one digest); the split seed
    still orders both parts and picks the capped subset."""
    split = {
        "version": _DIGEST_VERSION,
        "shape": list(data.train.shape),
        "levels": data.levels,
        "split_seed": config.split_seed,
        "max_images": config.max_images,
    }
    if config.name in IDX_SETS:
        split["split"] = "files"
    else:
        split["heldout_fraction"] = config.heldout_fraction
    digest = hashlib.sha256(json.dumps(split, sort_keys=True).encode())
    digest.update(data.train.detach().cpu().contiguous().numpy())  # the buffer itself, no copy
    return digest.hexdigest()[:16]


def describe_split(data: ImageData, config: DataConfig) -> dict[str, str | int]:
    """The `dataset` table's row (columns declared in ddpm_engine.metrics): the training data's
    name, digest, source and size. A tracker logs it as the run's input (MLflow: a dataset)."""
    return {
        "name": data.name,
        "digest": split_digest(data, config),
        "source": data_source(config),
        "train_images": int(data.train.shape[0]),
        "heldout_images": int(data.heldout.shape[0]),
        "channels": data.channels,
        "image_size": data.image_size,
        "levels": data.levels,
    }


# --- sources: each returns (uint8 N x C x H x W, int64 labels or None, levels, name) ---


def _load_digits(config: DataConfig):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    levels = 17
    images = torch.from_numpy(bunch.images.round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = _convert_tensor(images, levels, config.channels, config.image_size, "digits")
    return images, labels, levels, "digits"


def _load_npz(config: DataConfig):
    path = _require_path(config, "an .npz file")
    if not path.exists():
        raise DataError(f"data.path {path} does not exist; set data.path to an .npz file.")
    if path.is_dir():
        raise DataError(f"data.path {path} is a directory; for data.name='npz' point it at an .npz file.")
    array, labels = _read_array_file(path, config.npz_key)
    images = _to_nchw(array, path)
    images, levels = _array_to_levels(images, path, config.levels)
    if labels is not None and labels.shape[0] != images.shape[0]:
        warnings.warn(
            f"ignoring labels in {path}: {labels.shape[0]} labels for {images.shape[0]} images",
            stacklevel=2,
        )
        labels = None
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = _convert_tensor(tensor, levels, config.channels, config.image_size, str(path))
    label_tensor = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return tensor, label_tensor, levels, f"npz:{path.stem}"


def _load_torchvision(config: DataConfig):
    if not config.torchvision_set:
        raise DataError(
            "data.torchvision_set is required for data.name='torchvision'; "
            "set it to a class name such as MNIST or CIFAR10."
        )
    root = _require_path(config, "the torchvision data root folder")
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as exc:
        raise DataError(
            f"data.name='torchvision' needs the torchvision package, which is not installed "
            f"({exc}); "
            "install it, or save the images as an .npz file and use data.name='npz'."
        ) from exc
    cls = getattr(datasets, config.torchvision_set, None)
    if not inspect.isclass(cls):
        raise DataError(
            f"torchvision.datasets has no data set {config.torchvision_set!r}; "
            "set data.torchvision_set to a class name such as MNIST or CIFAR10."
        )
    dataset = _open_torchvision_set(cls, root, config.torchvision_set)
    images, labels = _torchvision_arrays(dataset, root)
    images, levels = _array_to_levels(images, root, None)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = _convert_tensor(tensor, levels, config.channels, config.image_size, str(root))
    return tensor, labels, levels, f"torchvision:{config.torchvision_set}"


def _load_image_folder(config: DataConfig):
    folder = _require_path(config, "a folder of PNG/JPEG images")
    if not folder.exists():
        raise DataError(f"data.path {folder} does not exist; set data.path to a folder of PNG/JPEG images.")
    if not folder.is_dir():
        raise DataError(
            f"data.path {folder} is not a directory; for data.name='image_folder' point it at a "
            "folder of PNG/JPEG images (use data.name='npz' for an array file)."
        )
    folder = folder.resolve()
    files = _image_files(folder)
    if not files:
        raise DataError(
            f"data.path {folder} holds no .png, .jpg or .jpeg files (searched recursively); "
            "point data.path at the folder that contains the images."
        )
    cache_file = engine_cache_dir(config) / f"image_folder-{_folder_key(folder, files, config)}.npy"
    images = _read_cache(cache_file, len(files))
    if images is None:
        images = _decode_folder(folder, files, config)
        _write_cache(cache_file, images)
    return torch.from_numpy(images), None, 256, f"image_folder:{folder.name}"


# --- IDX files (MNIST, Fashion-MNIST) ---


@dataclass(frozen=True)
class _IdxSet:
    title: str
    default_path: str | None
    how_to_get: str


# One reader serves every set distributed as the four IDX files of MNIST.
IDX_SETS: dict[str, _IdxSet] = {
    "fashion_mnist": _IdxSet(
        "Fashion-MNIST",
        "/usr/share/datasets/fashion-mnist",
        "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist; it puts them "
        "in /usr/share/datasets/fashion-mnist), or download the four files from "
        "https://github.com/zalandoresearch/fashion-mnist into data.path",
    ),
    "mnist": _IdxSet(
        "MNIST",
        None,
        "download the four files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from https://yann.lecun.com/exdb/mnist/ "
        "or a mirror into data.path",
    ),
}
# (train or held-out, file-name stem): the files' own split; t10k is the test set.
_IDX_PARTS = (("train", "train"), ("heldout", "t10k"))
# The IDX type byte -> element type; the data are big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(file: Path) -> np.ndarray:
    """The array in an IDX file (gzipped or not): magic 0x00 0x00 <type> <ndim>, then ndim
    big-endian uint32 sizes, then the data, big-endian. A file that is not IDX, or whose
    length disagrees with its header, is a DataError naming it."""
    raw = _read_idx_bytes(file)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{file} is not an IDX file (it starts with bytes {raw[:4].hex() or 'none'}, not the magic "
            "00 00 <type> <dimensions>); replace it with an intact copy."
        )
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{file} is truncated inside its header; replace it with an intact copy.")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - start != expected:
        state = "truncated" if len(raw) - start < expected else "longer than its header says"
        raise DataError(
            f"{file} is {state}: its header declares {' x '.join(map(str, shape))} values ({expected} bytes) "
            f"but {len(raw) - start} bytes follow; replace it with an intact copy."
        )
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)


def _read_idx_bytes(file: Path) -> bytes:
    try:
        raw = file.read_bytes()
        # By content, not suffix: a decompressed file keeping its .gz name still reads.
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as exc:
        # gzip reports a cut-off download as an early end of stream
        raise DataError(f"{file} is truncated or damaged ({exc}); replace it with an intact copy.") from exc


def _load_idx(config: DataConfig) -> ImageData:
    """The files' own split (train-* for training, t10k-* held out), each part shuffled by
    split_seed so that any prefix is a random sample; data.max_images caps the total with
    each part keeping its share (as split_sizes would split that many images)."""
    spec = IDX_SETS[config.name]
    folder = _idx_folder(config, spec)
    parts = {part: _read_idx_part(folder, stem, spec) for part, stem in _IDX_PARTS}
    train, held = parts["train"][0], parts["heldout"][0]
    if train.shape[1:] != held.shape[1:]:
        raise DataError(
            f"the {spec.title} files in {folder} disagree: training images are {train.shape[2]}x{train.shape[1]}, "
            f"test images {held.shape[2]}x{held.shape[1]}; replace them with one set's files."
        )
    counts = [train.shape[0], held.shape[0]]
    too_many = cap_problem(config.max_images, sum(counts), f"the {spec.title} files in {folder}")
    if too_many:
        raise DataError(too_many, key="data.max_images")
    if config.max_images is not None and config.max_images < sum(counts):
        keep = split_sizes(config.max_images, counts[1] / sum(counts))
        counts = [min(k, c) for k, c in zip(keep, counts)]
    generator = _generator(config.split_seed)
    out = []
    for (images, labels), count in zip(parts.values(), counts):
        order = torch.randperm(images.shape[0], generator=generator)[:count]
        tensor = torch.from_numpy(images[order.numpy()]).unsqueeze(1)  # fancy indexing copies: writable
        tensor = _convert_tensor(tensor, 256, config.channels, config.image_size, str(folder))
        tensor, levels = _apply_levels(tensor, 256, config)
        out += [tensor, torch.from_numpy(labels[order.numpy()].astype(np.int64))]
    return ImageData(
        name=config.name, train=out[0], heldout=out[2], levels=levels, train_labels=out[1], heldout_labels=out[3]
    )


def _idx_folder(config: DataConfig, spec: _IdxSet) -> Path:
    if not config.path and spec.default_path is None:
        raise DataError(
            f"data.path is required for data.name={config.name!r}: set it to the folder of the four "
            f"{spec.title} IDX files; to get them, {spec.how_to_get}."
        )
    folder = Path(config.path or spec.default_path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.path {folder} is not a folder of {spec.title} IDX files; to get them, {spec.how_to_get}."
        )
    return folder


def _read_idx_part(folder: Path, stem: str, spec: _IdxSet) -> tuple[np.ndarray, np.ndarray]:
    image_file = _idx_file(folder, f"{stem}-images", "idx3", spec)
    label_file = _idx_file(folder, f"{stem}-labels", "idx1", spec)
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{image_file} holds {images.dtype} values of shape {images.shape}, not N x H x W unsigned bytes; "
            "replace it with the images file of the set."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{label_file} holds {labels.dtype} values of shape {labels.shape}, not one integer per image.")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{label_file} has {labels.shape[0]} labels for the {images.shape[0]} images of {image_file}; "
            "replace them with matching files."
        )
    if images.shape[0] == 0:
        raise DataError(f"{image_file} holds no images.")
    return images, labels


def _idx_file(folder: Path, stem: str, kind: str, spec: _IdxSet) -> Path:
    # LeCun's and Zalando's names use "-idx3-ubyte"; some mirrors ship "train-images.idx3-ubyte".
    for separator in ("-", "."):
        for suffix in (".gz", ""):
            file = folder / f"{stem}{separator}{kind}-ubyte{suffix}"
            if file.is_file():
                return file
    raise DataError(
        f"data.path {folder} has no {spec.title} file {stem}-{kind}-ubyte(.gz); to get the files, {spec.how_to_get}."
    )


# --- image folders ---


def _image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found += [Path(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_SUFFIXES)]
    # Relative POSIX paths sort the same on every platform, so the split is reproducible.
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _folder_key(folder: Path, files: list[Path], config: DataConfig) -> str:
    # Size and mtime catch replaced or edited files without hashing every byte.
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    payload = {
        "format": _CACHE_FORMAT,
        "folder": str(folder),
        "files": entries,
        "image_size": config.image_size,
        "channels": config.channels,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]


def engine_cache_dir(config: DataConfig) -> Path:
    """Where the engine keeps what it derives once (decoded images, the classifiers of labelled data,
    reference losses): data.cache_dir, else $DDPM_ENGINE_CACHE, else ~/.cache/ddpm_engine."""
    chosen = config.cache_dir or os.environ.get("DDPM_ENGINE_CACHE") or "~/.cache/ddpm_engine"
    return Path(chosen).expanduser()


def _read_cache(cache_file: Path, count: int) -> np.ndarray | None:
    if not cache_file.exists():
        return None
    try:
        images = np.load(cache_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable cache {cache_file} ({exc}); decoding the images again", stacklevel=2)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count:
        warnings.warn(f"ignoring cache {cache_file} of unexpected shape; decoding the images again", stacklevel=2)
        return None
    return images


def _write_cache(cache_file: Path, images: np.ndarray) -> None:
    # A cache is a convenience: failing to write one must not fail the run.
    # Atomic, so a concurrent reader sees the old state or the whole new file.
    try:

        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # np.save given a name would append ".npy" to it
                np.save(handle, images)

        atomic_write(cache_file, save)
    except OSError as exc:
        warnings.warn(f"could not write image cache {cache_file} ({exc}); next load decodes again", stacklevel=2)


def _decode_folder(folder: Path, files: list[Path], config: DataConfig) -> np.ndarray:
    # Headers first: mismatched channels or sizes fail in seconds, not after a full decode.
    headers = [_read_header(file) for file in files]
    channels = config.channels or _common_channels(folder, files, headers)
    if config.image_size is not None:
        height = width = config.image_size
    else:
        height, width = _common_size(folder, files, headers)
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for index, file in enumerate(_progress(files, "decoding images")):
        images[index] = _decode_image(file, channels, config.image_size)
    return images


def _read_header(file: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(file) as img:
            return img.mode, img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {file} ({exc}); remove or replace the file.") from exc


def _mode_channels(mode: str) -> int:
    return 1 if mode in _GREY_MODES else 3


def _common_channels(folder: Path, files: list[Path], headers) -> int:
    counts = [_mode_channels(mode) for mode, _ in headers]
    if len(set(counts)) == 1:
        return counts[0]
    grey, colour = files[counts.index(1)], files[counts.index(3)]
    raise DataError(
        f"images in {folder} mix grey and colour (e.g. {grey.name} is grey, "
        f"{colour.name} is colour); "
        "set data.channels to 1 or 3 to convert them all."
    )


def _common_size(folder: Path, files: list[Path], headers) -> tuple[int, int]:
    sizes = [size for _, size in headers]
    first = sizes[0]
    for file, size in zip(files, sizes):
        if size != first:
            raise DataError(
                f"images in {folder} have different sizes (e.g. {files[0].name} is "
                f"{first[0]}x{first[1]}, {file.name} is {size[0]}x{size[1]}); "
                "set data.image_size to crop and resize them all to one square size."
            )
    width, height = first
    if width != height:
        raise DataError(
            f"images in {folder} are {width}x{height}, not square; "
            "set data.image_size to center-crop and resize them to a square."
        )
    return height, width


def _decode_image(file: Path, channels: int, size: int | None) -> np.ndarray:
    try:
        with Image.open(file) as img:
            img.load()
            img = _pil_channels(img, channels)
            if size is not None:
                img = img.resize((size, size), Image.Resampling.LANCZOS, box=_square_box(img.size))
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {file} ({exc}); remove or replace the file.") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _pil_channels(img: Image.Image, channels: int) -> Image.Image:
    if img.mode.startswith("I"):
        # PIL's convert clips 16-bit grey to 255 instead of scaling; scale by hand.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _square_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _progress(items, description: str):
    if len(items) < _PROGRESS_MIN_FILES:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="img", leave=False)


# --- array files and torchvision ---


def _read_array_file(path: Path, key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable_array_file(path, exc) from exc
    if isinstance(loaded, np.ndarray):
        # A plain .npy holds one array; there is no key to choose and no labels.
        if key is not None:
            raise DataError(f"{path} is a single .npy array, so data.npz_key must be unset.")
        return loaded, None
    with loaded:
        names = list(loaded.files)
        if not names:
            raise DataError(f"{path} holds no arrays; save the images into it with numpy.savez.")
        if key is None:
            key = names[0]
        elif key not in names:
            raise DataError(f"{path} has no array {key!r}; set data.npz_key to one of {names}.")
        label_key = next((k for k in ("labels", "y") if k in names and k != key), None)
        try:
            images = loaded[key]
            labels = loaded[label_key] if label_key else None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise _unreadable_array_file(path, exc) from exc
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        labels = None
    return images, labels


def _unreadable_array_file(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read {path} as a NumPy array file ({exc}); "
        "save the images with numpy.savez (plain numeric arrays, no pickled objects)."
    )


def _to_nchw(array: np.ndarray, source: Path) -> np.ndarray:
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array.transpose(0, 3, 1, 2)
    if array.ndim == 4 and array.shape[1] in (1, 3):
        return array
    raise DataError(
        f"images in {source} have shape {tuple(array.shape)}; expected N x H x W, "
        "N x H x W x C or N x C x H x W with C = 1 or 3."
    )


def _array_to_levels(array: np.ndarray, source: Path, levels: int | None) -> tuple[np.ndarray, int]:
    """Map an array of any supported dtype to uint8 levels; `levels` (from config) wins."""
    if array.shape[0] == 0:
        raise DataError(f"{source} holds no images; the image array is empty.")
    kind = array.dtype.kind
    if kind == "b":
        # Binary images: two levels unless the config says otherwise.
        return array.astype(np.uint8), levels or 2
    if kind in "iu":
        return _integer_levels(array, source, levels or 256)
    if kind == "f":
        return _float_levels(array, source, levels or 256)
    raise DataError(f"images in {source} have dtype {array.dtype}; use uint8, integers or floats in [0, 1] or [-1, 1].")


def _integer_levels(array: np.ndarray, source: Path, levels: int) -> tuple[np.ndarray, int]:
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= levels:
        raise DataError(
            f"images in {source} hold integers {low}..{high}, outside 0..{levels - 1}; "
            "store levels 0..255 (or set data.levels above the largest value)."
        )
    return array.astype(np.uint8), levels


def _float_levels(array: np.ndarray, source: Path, levels: int) -> tuple[np.ndarray, int]:
    if not np.isfinite(array).all():
        raise DataError(f"images in {source} contain NaN or infinite values; clean the array first.")
    low, high = float(array.min()), float(array.max())
    if low >= 0.0 and high <= 1.0:
        unit = array
    elif low >= -1.0 and high <= 1.0:
        unit = (array + 1.0) / 2.0
    else:
        raise DataError(
            f"images in {source} hold floats {low:g}..{high:g}; scale them to [0, 1] or [-1, 1] or store uint8 levels."
        )
    return np.rint(unit * (levels - 1)).astype(np.uint8), levels


def _open_torchvision_set(cls, root: Path, set_name: str):
    # Data sets differ in how they name the training split.
    params = inspect.signature(cls).parameters
    if "train" in params:
        split = {"train": True}
    else:
        split = {"split": "train"} if "split" in params else {}
    try:
        return cls(root=str(root), download=False, **split)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(
            f"torchvision {set_name} is not available under {root} ({exc}); "
            "download it there first (download=True once) or point data.path at its root."
        ) from exc


def _torchvision_arrays(dataset, root: Path) -> tuple[np.ndarray, torch.Tensor | None]:
    data = getattr(dataset, "data", None)
    if isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim in (3, 4):
        # Most sets keep every image in one array; converting that is much faster than iterating.
        images = _to_nchw(np.asarray(data), root)
        raw_labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    else:
        pairs = [dataset[i] for i in _progress(range(len(dataset)), "reading images")]
        images = _to_nchw(np.stack([np.asarray(image) for image, _ in pairs]), root)
        raw_labels = [target for _, target in pairs]
    return images, _label_tensor(raw_labels, images.shape[0])


def _label_tensor(raw, count: int) -> torch.Tensor | None:
    if raw is None:
        return None
    try:
        labels = torch.as_tensor(np.asarray(raw), dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        return None  # e.g. attribute dictionaries: not class labels
    return labels if labels.dim() == 1 and labels.shape[0] == count else None


# --- shared tensor steps ---


def _require_path(config: DataConfig, what: str) -> Path:
    if not config.path:
        raise DataError(f"data.path is required for data.name={config.name!r}; set it to {what}.")
    return Path(config.path).expanduser()


def _convert_tensor(
    images: torch.Tensor, levels: int, channels: int | None, size: int | None, source: str
) -> torch.Tensor:
    """Channel conversion and resize for sources already in memory."""
    if channels == 1 and images.shape[1] == 3:
        images = _to_grey(images, levels)
    if size is not None and images.shape[-2:] != (size, size):
        images = _resize(images, size, levels)
    elif size is None and images.shape[-2] != images.shape[-1]:
        raise DataError(
            f"images in {source} are {images.shape[-1]}x{images.shape[-2]}, not square; "
            "set data.image_size to center-crop and resize them to a square."
        )
    if channels == 3 and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous()


def _to_grey(images: torch.Tensor, levels: int) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
    return grey.round().clamp(0, levels - 1).to(torch.uint8)


def _resize(images: torch.Tensor, size: int, levels: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float32)
        # Antialiasing matters when shrinking: plain bilinear aliases thin strokes away.
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        # Re-quantize so the data still has exactly `levels` levels, as L_0 assumes.
        out[start : start + _RESIZE_CHUNK] = resized.round().clamp(0, levels - 1).to(torch.uint8)
    return out


def _requantize(images: torch.Tensor, old_levels: int, new_levels: int) -> torch.Tensor:
    scaled = images.to(torch.float32) * ((new_levels - 1) / (old_levels - 1))
    return scaled.round().clamp(0, new_levels - 1).to(torch.uint8)


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _split(images: torch.Tensor, labels: torch.Tensor | None, levels: int, name: str, config: DataConfig) -> ImageData:
    count = images.shape[0]
    if count < 2:
        raise DataError(f"data set {name} has {count} image(s); a train / held-out split needs at least 2.")
    held = split_sizes(count, config.heldout_fraction)[1]
    # The permutation order is kept (not sorted) so any prefix of either part is a random sample.
    order = torch.randperm(count, generator=_generator(config.split_seed))
    held_idx, train_idx = order[:held], order[held:]
    return ImageData(
        name=name,
        train=images[train_idx],
        heldout=images[held_idx],
        levels=levels,
        train_labels=None if labels is None else labels[train_idx],
        heldout_labels=None if labels is None else labels[held_idx],
    )
