"""What a config implies about sizes, and what it asks of its data, without importing torch.

A config can be valid on its own and still fail with its data: attention at a side the UNet
never reaches on these images (silently no attention), more levels than uint8 pixels hold,
too few images for the quality metrics (a failure after all the training). ``problems`` finds
these from the config and the data's size alone, so the harness checks every arm before any
training starts, where importing torch would cost seconds. The model and the data loader
use the same functions, so the check and the run cannot disagree.
"""

from __future__ import annotations

from .config import DataConfig, ExperimentConfig
from .metrics import REFERENCE_NAMES

MAX_LEVELS = 256  # the data are kept as uint8 levels: the memory budget that lets big folders fit
DIGITS_IMAGES, DIGITS_SIDE = 1797, 8  # scikit-learn's load_digits
QUALITY_MIN_IMAGES = 2  # a covariance (the Frechet distance) needs two images


def feature_map_sides(image_size: int, channel_mults: tuple[int, ...]) -> list[int]:
    """The side of the UNet's feature maps at each level: halved (rounding up) per level."""
    sides = [image_size]
    for _ in channel_mults[1:]:
        if sides[-1] < 2:
            raise ValueError(
                f"image_size {image_size} cannot be halved {len(channel_mults) - 1} times "
                f"for channel_mults {tuple(channel_mults)}: the feature map reaches 1x1 "
                f"after {len(sides) - 1} downsamples; use fewer levels"
            )
        sides.append((sides[-1] + 1) // 2)
    return sides


def split_sizes(count: int, heldout_fraction: float) -> tuple[int, int]:
    """(training, held-out) image counts of the fixed split of ``count`` images."""
    held = min(max(round(count * heldout_fraction), 1), count - 1)
    return count - held, held


def cap_problem(max_images: int | None, available: int, source: str) -> str | None:
    """Why data.max_images cannot be met by ``source``, which holds ``available`` images (every
    image the cap applies to: training and held out together), or None. A cap above the
    source's size would silently use every image, and a study of data-set sizes would then
    compare two arms trained on the same data."""
    if max_images is None or max_images <= available:
        return None
    return (
        f"{max_images:,} images asked for, but there are {available:,} in {source} (training and held out "
        "together); lower it, or leave max_images unset to use them all"
    )


def digits_extent(config: DataConfig) -> tuple[int, int]:
    """(images, side) of the digits as ``config`` loads them, known without loading them."""
    images = DIGITS_IMAGES if config.max_images is None else min(DIGITS_IMAGES, config.max_images)
    return images, config.image_size or DIGITS_SIDE


def problems(
    config: ExperimentConfig, images: int | None = None, image_size: int | None = None, heldout: int | None = None
) -> list[tuple[str, str]]:
    """(dotted key, reason) for each setting that cannot work with data of ``images`` images
    (after data.max_images) of side ``image_size``; without them, the checks that need no data.
    ``heldout``: how many of them are held out, when known (data sets with their own split,
    such as Fashion-MNIST, ignore data.heldout_fraction); else data.heldout_fraction says."""
    found: list[tuple[str, str]] = []
    data, quality = config.data, config.eval.quality
    if data.name == "digits":  # their size is known without loading them; other sources check as they load
        too_many = cap_problem(data.max_images, DIGITS_IMAGES, "the digits")
        if too_many:
            found.append(("data.max_images", too_many))
    if data.levels is not None and data.levels > MAX_LEVELS:
        found.append(
            (
                "data.levels",
                f"{data.levels} levels do not fit the uint8 pixels the data are kept in: at most {MAX_LEVELS}",
            )
        )
    if quality and config.sample.num_samples < QUALITY_MIN_IMAGES:
        found.append(
            (
                "sample.num_samples",
                f"{config.sample.num_samples} sample: the sample-quality metrics need at least {QUALITY_MIN_IMAGES} "
                "(they would fail after training); draw more, or set eval.quality: false",
            )
        )
    if images is not None:
        # the key that made the data this small: max_images, a large held-out share, else the data
        size_key = (
            "data.max_images"
            if data.max_images is not None
            else ("data.heldout_fraction" if data.heldout_fraction > 0.5 and heldout is None else "data.path")
        )
        if heldout is not None:
            train, held = images - heldout, heldout
        else:
            train, held = split_sizes(images, data.heldout_fraction) if images >= 2 else (images, 0)
        if images < 2:
            found.append((size_key, f"{images} image(s): a train / held-out split needs at least 2"))
        elif quality and train < QUALITY_MIN_IMAGES:
            found.append(
                (
                    size_key,
                    f"{images} images leave {train} for training ({held} held out); the sample-quality metrics "
                    f"compare samples with at least {QUALITY_MIN_IMAGES} training images (they would fail after "
                    "training); use more images, or set eval.quality: false",
                )
            )
    if image_size is not None and config.model.preset not in REFERENCE_NAMES:
        model = config.model
        try:
            sides = feature_map_sides(image_size, model.channel_mults)
        except ValueError as error:
            found.append(("model.channel_mults", str(error)))
        else:
            never = sorted(set(model.attention_resolutions) - set(sides))
            if never:
                found.append(
                    (
                        "model.attention_resolutions",
                        f"attention at side {', '.join(map(str, never))}: no feature map of this UNet on "
                        f"{image_size}x{image_size} images has that side, so none would be added; its sides are "
                        f"{', '.join(map(str, sides))}",
                    )
                )
    return found
