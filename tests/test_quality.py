"""Tests of ddpm_engine.quality: Frechet distance, the cached classifier of a data set's labels,
metrics.

Digits come straight from scikit-learn's load_digits so most tests do not depend on
ddpm_engine.data. The classifier is trained once per module into a temporary cache.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ddpm_engine import quality
from ddpm_engine.quality import (
    ImageClassifier,
    feature_statistics,
    frechet_distance,
    load_classifier,
    sample_quality,
)

# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """80/20 split of scikit-learn digits: uint8 0..16 images and [-1, 1] floats."""
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.uint8)[:, None]
    labels = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(images))
    tr, te = perm[:n_train], perm[n_train:]
    to_float = lambda x: x.float() / 16.0 * 2.0 - 1.0  # noqa: E731
    return {
        "train_u8": images[tr],
        "train_y": labels[tr],
        "train": to_float(images[tr]),
        "test": to_float(images[te]),
        "test_y": labels[te],
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm_cache")


@pytest.fixture(scope="module")
def classifier(digits, cache_dir):
    return load_classifier(digits["train_u8"], digits["train_y"], 17, cache_dir)


def _gaussian_stats(d: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, 2 * d))
    return rng.normal(size=d), a @ a.T / d


# ---------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------


def test_fd_of_identical_statistics_is_zero():
    mu, cov = _gaussian_stats(16, 0)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_is_symmetric():
    a, b = _gaussian_stats(20, 1), _gaussian_stats(20, 2)
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-10)


def test_fd_matches_scipy_sqrtm_for_full_covariances():
    (mu1, c1), (mu2, c2) = _gaussian_stats(32, 3), _gaussian_stats(32, 4)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * covmean)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)


def test_fd_is_finite_for_singular_covariances():
    rng = np.random.default_rng(5)
    # Fewer samples than dimensions: both covariances have rank < 64.
    a = feature_statistics(rng.normal(size=(10, 64)))
    b = feature_statistics(rng.normal(size=(12, 64)) + 0.1)
    fd = frechet_distance(*a, *b)
    assert math.isfinite(fd) and fd > 0
    assert frechet_distance(*a, *b, eps=1e-6) == pytest.approx(fd, rel=1e-3)


def test_feature_statistics_matches_numpy():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, cov = feature_statistics(x)
    assert mu.dtype == np.float64 and cov.shape == (6, 6)
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


# ---------------------------------------------------------------------------------------
# classifier and cache
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def test_classifier_accuracy_on_heldout_digits(classifier, digits):
    assert _accuracy(classifier, digits["test"], digits["test_y"]) > 0.95


def test_classifier_handles_other_sizes_and_channels(classifier, digits):
    up = F.interpolate(digits["test"], size=(16, 16), mode="bilinear", align_corners=False)
    assert _accuracy(classifier, up, digits["test_y"]) > 0.9
    assert _accuracy(classifier, up.repeat(1, 3, 1, 1), digits["test_y"]) > 0.9
    assert classifier.features(up).shape == (len(up), 64)


def test_second_load_hits_the_cache(classifier, digits, cache_dir, monkeypatch):
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # written atomically: no temp left

    def fail(*args, **kwargs):
        raise AssertionError("classifier retrained despite a cached copy")

    monkeypatch.setattr(quality, "_train_classifier", fail)
    again = load_classifier(digits["train_u8"], digits["train_y"], 17, cache_dir)
    for a, b in zip(classifier.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_cache_key_depends_on_the_data(digits):
    x, y = digits["train_u8"], digits["train_y"]
    key = quality._cache_key(x, y)
    assert key == quality._cache_key(x.clone(), y.clone())
    assert key != quality._cache_key(x[1:], y[1:])
    assert key != quality._cache_key(x, torch.roll(y, 1))


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    assert quality._cache_dir(None) == tmp_path


# ---------------------------------------------------------------------------------------
# sample quality
# ---------------------------------------------------------------------------------------


def _one_class(digits, cls: int = 3) -> torch.Tensor:
    """As many samples as the held-out set, all copies of held-out digits of one class."""
    x = digits["test"][digits["test_y"] == cls]
    n = len(digits["test"])
    return x.repeat(math.ceil(n / len(x)), 1, 1, 1)[:n]


def _noise(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_fd_separates_real_from_noise_and_collapse(classifier, digits):
    ref = digits["train"]
    real = sample_quality(digits["test"], ref, classifier)
    noise = sample_quality(_noise(len(digits["test"])), ref, classifier)
    collapsed = sample_quality(_one_class(digits), ref, classifier)
    assert real["fd"] * 10 < noise["fd"]
    assert real["fd"] * 10 < collapsed["fd"]
    assert real["confidence"] > noise["confidence"]


def test_coverage_of_real_and_collapsed_samples(classifier, digits):
    real = sample_quality(digits["test"], digits["train"], classifier)
    collapsed = sample_quality(_one_class(digits), digits["train"], classifier)
    assert real["coverage"] == 1.0
    assert real["class_entropy"] > 3.2  # log2(10) = 3.32 for a uniform spread
    assert collapsed["coverage"] <= 0.2
    assert collapsed["class_entropy"] < 0.5


def test_pixel_fallback_without_classifier(digits):
    ref = digits["train"]
    real = sample_quality(digits["test"], ref, None)
    noise = sample_quality(_noise(len(digits["test"])), ref, None)
    assert math.isnan(real["coverage"])
    assert real["fd"] * 10 < noise["fd"]
    big = F.interpolate(digits["test"], size=(32, 32), mode="bilinear", align_corners=False)
    assert math.isfinite(sample_quality(big.repeat(1, 3, 1, 1), ref.repeat(1, 3, 1, 1))["fd"])


def test_saturation_and_mean_gap(digits):
    ones = torch.ones(16, 1, 8, 8)
    out = sample_quality(ones, digits["train"], None, levels=17)
    assert out["sat_frac"] == 1.0
    assert 0.0 < out["ref_sat_frac"] < 1.0
    assert out["sat_gap"] == pytest.approx(1.0 - out["ref_sat_frac"])
    assert out["pixel_mean_gap"] == pytest.approx(1.0 - float(digits["train"].mean()), abs=1e-6)


def test_sample_quality_is_deterministic(classifier, digits):
    a = sample_quality(digits["test"], digits["train"], classifier)
    b = sample_quality(digits["test"], digits["train"], classifier)
    assert a == b


def test_saturation_is_counted_on_the_data_levels():
    """17 levels: a level is 0.125 wide. 0.95 rounds to the top level (what a viewer sees as
    white) although |x| < 0.99; 0.9 rounds to the level below; 1.3 and -1.2 clip to the ends."""
    from ddpm_engine.quality import saturated_fraction, to_levels

    x = torch.tensor([0.95, 0.9, 1.3, -1.2, -0.95, 0.0, -0.9, 0.5])
    assert to_levels(x, 17).tolist() == [16, 15, 16, 0, 0, 8, 1, 12]
    assert float(saturated_fraction(x, 17)) == pytest.approx(4 / 8)
    assert float(saturated_fraction(x, 256)) == pytest.approx(2 / 8)  # finer levels: only the clipped ones


def test_saturation_splits_into_black_and_white_that_add_up():
    """Samples all black against a reference half black, a quarter white: every pixel is at an
    end, so sat_gap is small, but the split says "too dark" (+0.5 black, -0.25 white)."""
    ref = torch.cat([-torch.ones(8, 1, 4, 4), torch.ones(4, 1, 4, 4), torch.zeros(4, 1, 4, 4)])
    out = sample_quality(-torch.ones(16, 1, 4, 4), ref, None, levels=17)
    assert (out["sat_low_frac"], out["ref_sat_low_frac"]) == (1.0, 0.5)
    assert (out["sat_high_frac"], out["ref_sat_high_frac"]) == (0.0, 0.25)
    assert out["sat_low_gap"] == pytest.approx(0.5) and out["sat_high_gap"] == pytest.approx(-0.25)
    assert out["sat_frac"] == pytest.approx(out["sat_low_frac"] + out["sat_high_frac"])
    assert out["sat_gap"] == pytest.approx(out["sat_low_gap"] + out["sat_high_gap"])
    # a sample just inside the top level's rounding (0.95 at 17 levels) counts as white
    bright = sample_quality(torch.full((16, 1, 4, 4), 0.95), ref, None, levels=17)
    assert (bright["sat_low_frac"], bright["sat_high_frac"]) == (0.0, 1.0)


def _images_with_means(means: list[float], seed: int) -> torch.Tensor:
    """4x4 images whose mean pixel is exactly ``means[i]``: that value plus a pattern of mean 0."""
    pattern = torch.randn(len(means), 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pattern = 0.3 * (pattern - pattern.mean(dim=(1, 2, 3), keepdim=True))
    return torch.tensor(means, dtype=torch.float64).view(-1, 1, 1, 1) + pattern


def test_brightness_spread_is_the_std_of_the_per_image_means():
    """Per-image means 0, 0.1, 0.2, 0.3 have std sqrt(((0.15^2 + 0.05^2) 2) / 3) = 0.1291 (n - 1);
    samples whose means are -0.2 and 0.2 (half each) against them: std 0.2 sqrt(8/7) = 0.2138.
    The pattern inside each image (its pixel contrast) counts for nothing."""
    from ddpm_engine.quality import brightness_spread

    reference = _images_with_means([0.0, 0.1, 0.2, 0.3], seed=0)
    assert brightness_spread(reference) == pytest.approx(math.sqrt((0.15**2 + 0.05**2) * 2 / 3), rel=1e-12)
    samples = _images_with_means([-0.2, 0.2] * 4, seed=1)
    out = sample_quality(samples.float(), reference.float(), None, levels=256)
    assert out["brightness_std"] == pytest.approx(0.2 * math.sqrt(8 / 7), rel=1e-6)
    assert out["ref_brightness_std"] == pytest.approx(0.1291, abs=1e-4)
    assert out["brightness_std_gap"] == pytest.approx(out["brightness_std"] - out["ref_brightness_std"])
    # every image equally bright: no spread, however different the pictures; a shift of all: none either
    assert brightness_spread(_images_with_means([0.1] * 5, seed=2)) == pytest.approx(0.0, abs=1e-15)
    assert brightness_spread(reference - 0.5) == pytest.approx(brightness_spread(reference), rel=1e-12)
    assert math.isnan(brightness_spread(reference[:1]))


# ---------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------


def _shifted_right(x: torch.Tensor) -> torch.Tensor:
    """Each image moved one pixel right, the vacated column the background (-1)."""
    out = torch.roll(x, 1, dims=3)
    out[..., 0] = -1.0
    return out


def test_memorised_frac_flags_copies_and_only_copies(digits):
    """The ratio test says: memorised when the nearest training image is closer than 1/3 of the
    second nearest. Copies (exact or with mild noise) are; unseen digits, digits shifted by a
    pixel and even blends of two training digits are not, although the last two score far from
    the unseen digits on nn_heldout_ratio (which is why that ratio is no memorisation test)."""
    train, test = digits["train"], digits["test"]
    gen = torch.Generator().manual_seed(0)
    copies = train[:200]
    noisy = copies + 0.05 * torch.randn(copies.shape, generator=gen)
    shifted = _shifted_right(train[:200])
    partner = torch.randint(len(train), (200,), generator=gen)
    blends = 0.5 * train[:200] + 0.5 * train[partner]
    frac = {
        name: quality.memorisation(x, train, test)
        for name, x in [("copies", copies), ("noisy", noisy), ("test", test), ("shifted", shifted), ("blends", blends)]
    }
    assert frac["copies"]["memorised_frac"] == 1.0 and frac["copies"]["nn_train_dist"] == 0.0
    assert frac["noisy"]["memorised_frac"] > 0.9
    assert frac["test"]["memorised_frac"] < 0.02
    assert frac["shifted"]["memorised_frac"] < 0.02
    assert frac["blends"]["memorised_frac"] < 0.02
    assert frac["shifted"]["nn_heldout_ratio"] > 1.5 and frac["blends"]["nn_heldout_ratio"] > 1.2


def test_an_even_blend_of_a_digit_and_its_nearest_neighbour_has_ratio_one(digits):
    """Halfway between two training images (its two nearest) d1 = d2: never memorised, whatever
    the threshold below 1, and the ratio test sees exactly that."""
    train = digits["train"]
    flat = train.flatten(1).double()
    distances = torch.cdist(flat[:50], flat)
    distances[torch.arange(50), torch.arange(50)] = math.inf
    blends = 0.5 * train[:50] + 0.5 * train[distances.argmin(1)]
    nearest = quality.nearest_distances(blends, train, k=2)
    torch.testing.assert_close(nearest[:, 0], nearest[:, 1], rtol=1e-6, atol=1e-9)
    assert quality.memorisation(blends, train, digits["test"])["memorised_frac"] == 0.0
    # and k = 1 is the first column of k = 2
    torch.testing.assert_close(quality.nearest_distances(blends, train), nearest[:, 0])


# ---------------------------------------------------------------------------------------
# The classifier of any labelled set
# ---------------------------------------------------------------------------------------

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _made_set(per_class: int = 240, side: int = 12, classes: int = 10):
    """A labelled set with the traits the FD must see: each class a smooth template of its own
    (random 4x4 grids upsampled), each image its class's template shifted by up to a pixel,
    scaled in contrast and noised; uint8 levels 0..255. For when Fashion-MNIST is absent."""
    gen = torch.Generator().manual_seed(7)
    templates = F.interpolate(torch.rand(classes, 1, 4, 4, generator=gen), size=(side + 2, side + 2), mode="bilinear")
    labels = torch.arange(classes).repeat_interleave(per_class)
    n = len(labels)
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    images = torch.stack([templates[c, :, y : y + side, x : x + side] for c, y, x in zip(labels, dy, dx)])
    images = images * (0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)) + 0.08 * torch.randn(
        images.shape, generator=gen
    )
    order = torch.randperm(n, generator=gen)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)[order]
    return images, labels[order]


@pytest.fixture(scope="module", params=["digits", "fashion"])
def labelled(request, digits, classifier, cache_dir):
    """(train, held-out, their labels, the classifier, a well separated class) of digits and of
    Fashion-MNIST at 14x14 (7,000 images), or of a set this test makes where it is absent."""
    if request.param == "digits":
        return dict(
            train=digits["train"], heldout=digits["test"], heldout_y=digits["test_y"], model=classifier, clear=0
        )
    import os

    from ddpm_engine.config import DataConfig
    from ddpm_engine.data import load_data

    if os.path.isdir(FASHION_MNIST):
        data = load_data(DataConfig(name="fashion_mnist", image_size=14, max_images=7000))
        train_u8, train_y, held_u8, held_y, clear = data.train, data.train_labels, data.heldout, data.heldout_labels, 1
    else:
        images, labels = _made_set()
        train_u8, train_y, held_u8, held_y, clear = images[400:], labels[400:], images[:400], labels[:400], 0
    model = load_classifier(train_u8, train_y, 256, cache_dir)
    to_float = lambda x: x.float() / 255.0 * 2.0 - 1.0  # noqa: E731
    return dict(train=to_float(train_u8), heldout=to_float(held_u8), heldout_y=held_y, model=model, clear=clear)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-((torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2) / 2)
    taps = taps / taps.sum()
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(rows, taps.view(1, 1, -1, 1))


def _without_classes(x: torch.Tensor, y: torch.Tensor, dropped: int) -> torch.Tensor:
    """As many images as `x`, drawn (with replacement) from the classes left after dropping
    the first `dropped`: a model that never makes those classes."""
    pool = x[y >= dropped]
    pick = torch.randint(len(pool), (len(x),), generator=torch.Generator().manual_seed(dropped))
    return pool[pick]


def test_fd_of_heldout_is_small_and_of_noise_large(labelled):
    ref, held = labelled["train"], labelled["heldout"]
    real = sample_quality(held, ref, labelled["model"])
    noise = sample_quality(
        torch.rand(held.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1, ref, labelled["model"]
    )
    assert real["fd"] * 20 < noise["fd"], (real["fd"], noise["fd"])
    assert real["coverage"] == 1.0 and real["class_entropy"] > 3.2
    assert real["confidence"] > noise["confidence"]


def test_fd_grows_with_blur(labelled):
    ref, held, model = labelled["train"], labelled["heldout"], labelled["model"]
    fds = [sample_quality(held if s == 0 else _blur(held, s), ref, model)["fd"] for s in (0, 0.5, 1.0, 2.0)]
    assert fds == sorted(fds) and fds[-1] > 5 * fds[0], fds


def test_fd_grows_with_the_classes_dropped(labelled):
    ref, held, y, model = labelled["train"], labelled["heldout"], labelled["heldout_y"], labelled["model"]
    out = [sample_quality(_without_classes(held, y, k), ref, model) for k in (0, 3, 6, 9)]
    fds = [o["fd"] for o in out]
    assert fds == sorted(fds) and fds[-1] > 5 * fds[0], fds
    # Fashion-MNIST's shirts pass for T-shirts and pullovers often enough to cover them: coverage
    # falls with each drop but not always to the classes left (there 1.0, 0.9, 0.6, 0.2)
    coverage = [o["coverage"] for o in out]
    assert coverage == sorted(coverage, reverse=True) and len(set(coverage)) == 4
    assert coverage[0] == 1.0 and coverage[-1] <= 0.2, coverage


def test_coverage_of_one_class_is_a_tenth(labelled):
    held, y = labelled["heldout"], labelled["heldout_y"]
    one = held[y == labelled["clear"]]
    out = sample_quality(one, labelled["train"], labelled["model"])
    assert out["coverage"] == pytest.approx(0.1)
    assert out["class_entropy"] < 0.8


def test_classes_are_the_distinct_labels(tmp_path):
    """Labels 3, 7, 42 are three classes (coverage of one is 1/3); one distinct label is no
    classifier, and the caller falls back to pixel features."""
    images, labels = _made_set(per_class=60, side=8, classes=3)
    named = torch.tensor([3, 7, 42])[labels]
    model = load_classifier(images, named, 256, tmp_path)
    assert model.num_classes == 3 and model.side == 8
    x = images.float() / 255 * 2 - 1
    assert sample_quality(x[labels == 1], x, model)["coverage"] == pytest.approx(1 / 3)
    assert load_classifier(images, torch.zeros_like(labels), 256, tmp_path) is None


def test_classifier_side_is_capped_for_the_cpu():
    from ddpm_engine.quality import MAX_CLASSIFIER_SIDE, classifier_side

    assert classifier_side(28) == MAX_CLASSIFIER_SIDE == 16
    assert classifier_side(14) == 14 and classifier_side(13) == 12
    assert classifier_side(32, native_side=8) == 8  # upsampled digits are classified at 8x8


def test_quality_summary_uses_the_labels_of_any_source():
    """npz (or Fashion-MNIST) images with labels get class metrics; without labels NaN."""
    import types

    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.data import ImageData
    from ddpm_engine.experiment import quality_summary

    images, labels = _made_set(per_class=40, side=8)
    config = ExperimentConfig.from_dict({"data": {"name": "npz", "path": "unused.npz"}})
    with_labels = ImageData("npz:x", images[40:], images[:40], 256, labels[40:], labels[:40])
    without = ImageData("npz:x", images[40:], images[:40], 256)
    samples = with_labels.to_model_space(images[:40])
    labelled_out = quality_summary(types.SimpleNamespace(config=config, data=with_labels), samples)
    plain_out = quality_summary(types.SimpleNamespace(config=config, data=without), samples)
    assert labelled_out["coverage"] > 0.5 and math.isfinite(labelled_out["confidence"])
    assert math.isnan(plain_out["coverage"]) and math.isfinite(plain_out["fd"])
    assert labelled_out["fd"] != plain_out["fd"]


def test_quality_reference_uncapped_judges_every_max_images_by_the_full_split():
    """eval.quality_reference: uncapped measures samples of a run on 100 digits against the
    training split of all 1,797 (its images and its classifier), as the run on all of them is
    measured; memorisation stays against the run's own 90 training images."""
    from types import SimpleNamespace

    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.data import load_data
    from ddpm_engine.experiment import quality_summary

    uncapped = ExperimentConfig.from_dict({"data": {"max_images": 100}, "eval": {"quality_reference": "uncapped"}})
    split = ExperimentConfig.from_dict({"data": {"max_images": 100}})
    capped, full = load_data(uncapped.data), load_data(ExperimentConfig().data)
    assert capped.train.shape[0] == 90
    samples = full.to_model_space(full.heldout[:64])  # real digits: coverage and fd are those of data
    expected = sample_quality(
        samples,
        full.to_model_space(full.train),
        load_classifier(full.train, full.train_labels, 17, None),
        levels=17,
    )
    by_uncapped = quality_summary(SimpleNamespace(config=uncapped, data=capped), samples)
    by_split = quality_summary(SimpleNamespace(config=split, data=capped), samples)
    for name in ("fd", "coverage", "ref_sat_frac", "pixel_mean_gap"):
        assert by_uncapped[name] == pytest.approx(expected[name]), name
    assert by_split["fd"] != pytest.approx(expected["fd"])  # against its own 90 images: another number
    assert by_split["ref_sat_frac"] != pytest.approx(expected["ref_sat_frac"])
    for name in ("memorised_frac", "nn_train_dist", "nn_heldout_ratio"):
        assert by_uncapped[name] == by_split[name], name
