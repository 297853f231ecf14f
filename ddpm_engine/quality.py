"""Sample quality: Frechet distance, class coverage and pixel statistics of generated images.

For labelled data (digits, Fashion-MNIST, MNIST, arrays with labels, torchvision sets with
targets) the Frechet distance is taken in the 64-dim penultimate layer of a small CNN trained
once on the data's training split and cached on disk (a small stand-in for the Inception
network of FID, at most 16x16); its predictions give class coverage, entropy and confidence.
For data without labels there is no such network, so the distance is taken on pixels of
images downsampled to at most 8x8, and the class metrics are undefined (NaN).

Reference: Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017 (FID).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_write

__all__ = [
    "CLASSIFIER_VERSION",
    "ImageClassifier",
    "classifier_side",
    "feature_statistics",
    "frechet_distance",
    "load_classifier",
    "sample_quality",
]

# Part of the cache key: bump whenever the architecture or the training recipe changes,
# so that stale weights are never loaded into a different model. v2: any labelled data set
# (channels, side and classes from the data; on digits the same network and weights as v1).
CLASSIFIER_VERSION = "image-cnn-v2"

_SIDE = 8  # scikit-learn digits are 8x8: the pixel features' side, and the digits classifier's
_NUM_CLASSES = 10
MAX_CLASSIFIER_SIDE = 16  # the CPU budget of training on a large set (see _epochs)
MAX_CLASSES = 1000  # more distinct labels than this are ids (of people, of files), not classes
_FEATURE_DIM = 64
_SEED = 0
_EPOCHS = 30
_MIN_EPOCHS = 2
_IMAGES_SEEN = 150_000  # image passes of a large set's training (see _epochs)
_BATCH = 64
_LR = 3e-3
_ROUND_TRIP_P = 0.5  # share of training batches seen through an upsample/downsample trip
_ROUND_TRIP_FACTORS = (1.5, 2, 3, 4)  # digits' 12, 16, 24, 32
_EVAL_BATCH = 1024
_COVERAGE_SHARE = 0.2  # a class is "covered" with >= 20% of its fair share of samples


# ---------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of an N x D feature matrix, N >= 2."""
    x = _as_float64(features)
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, cov


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 0.0) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    Heusel et al. 2017, eq. (6):
        d^2 = ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2}).

    (C1 C2)^{1/2} is not computed directly: C1 C2 is not symmetric, so a generic sqrtm
    returns round-off imaginary parts and fails when the product is singular (fewer
    samples than feature dimensions, dead ReLU units), which is why FID code adds eps*I.
    Instead we use that C1 C2 = S (S C2) and S C2 S (S = C1^{1/2}) share their eigenvalues,
    and S C2 S is symmetric PSD, so Tr (C1 C2)^{1/2} = sum_i sqrt(lambda_i(S C2 S)) with real
    eigenvalues from `eigh`; tiny negative ones from round-off are clipped to 0. This is
    exact for singular covariances, so no offset is needed; `eps` > 0 still adds eps*I to
    both covariances for those who want to match the regularised FID implementations.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    cov1, cov2 = np.atleast_2d(_as_float64(cov1)), np.atleast_2d(_as_float64(cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size,) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, cov1, cov2)):
        return float("nan")  # e.g. samples of a diverged model; no distance is meaningful
    if eps > 0:
        offset = eps * np.eye(mu1.size)
        cov1, cov2 = cov1 + offset, cov2 + offset
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(cov1, cov2)
    d2 = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    # The exact value is >= 0; round-off can push identical statistics slightly below.
    return max(d2, 0.0)


def _trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """Tr (C1 C2)^{1/2} for symmetric PSD C1, C2 via S C2 S, S = C1^{1/2}."""
    s1 = _psd_sqrt(cov1)
    middle = s1 @ _symmetrize(cov2) @ s1
    eigvals = np.linalg.eigvalsh(_symmetrize(middle))
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative round-off clipped."""
    eigvals, eigvecs = np.linalg.eigh(_symmetrize(cov))
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _symmetrize(a: np.ndarray) -> np.ndarray:
    # Covariances are symmetric in exact arithmetic; eigh reads only one triangle, so
    # averaging keeps both triangles' information instead of silently dropping one.
    return 0.5 * (a + a.T)


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Classifier of the data set's labels
# ---------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """Small CNN for C x side x side images in [-1, 1]; its 64-dim penultimate layer is the FD
    space. On digits (1 x 8 x 8, 10 classes) it is the earlier digit classifier (digit-cnn-v1)
    unchanged, so the digits' quality numbers are the same as before it was generalised.

    Any input is first mapped to the native format: channels averaged to grey (or grey
    repeated), then resized to side x side with antialiased bilinear interpolation, so samples
    at any `image_size` (or RGB renderings of grey data) are scored by the same network.
    """

    def __init__(self, in_channels: int = 1, side: int = _SIDE, num_classes: int = _NUM_CLASSES) -> None:
        super().__init__()
        self.in_channels, self.side, self.num_classes = in_channels, side, num_classes
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc = nn.Linear(32 * (side // 2) ** 2, _FEATURE_DIM)
        self.head = nn.Linear(_FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, N x 64."""
        h = self.to_native(x.to(self.conv1.weight))  # match the weights' dtype and device
        h = F.relu(self.conv1(h))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, N x num_classes."""
        return self.head(self.features(x))

    def to_native(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in [-1, 1] -> N x in_channels x side x side."""
        return _to_native(x, self.in_channels, self.side)


def _to_native(x: torch.Tensor, channels: int, side: int) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    if x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return x


def classifier_side(image_size: int, native_side: int | None = None) -> int:
    """The side the classifier sees: the data's native side where it is known and smaller
    (digits are 8x8 whatever image_size upsamples them to), at most MAX_CLASSIFIER_SIDE (the
    CPU budget: 28x28 Fashion-MNIST is seen at 16x16), and even (one 2x2 pooling)."""
    side = min(image_size, native_side or image_size, MAX_CLASSIFIER_SIDE)
    return max(2, side - side % 2)


def load_classifier(
    train_images: torch.Tensor,
    train_labels,
    levels: int,
    cache_dir: str | Path | None = None,
    side: int | None = None,
) -> ImageClassifier | None:
    """The classifier of this training split's labels: loaded from cache, else trained once.

    `train_images` is N x C x H x W with integer levels 0..levels-1 (17 levels for digits),
    mapped to [-1, 1] as the data are; `side` is the classifier's input side (None:
    `classifier_side` of the images' side). The classes are the distinct labels; None when
    there are fewer than 2 or more than MAX_CLASSES (labels that are ids, not classes), and
    the caller falls back to pixel features. Weights are cached under `cache_dir` (None:
    $DDPM_ENGINE_CACHE, else ~/.cache/ddpm_engine) keyed by a hash of the training split's
    images and labels, the side and CLASSIFIER_VERSION, so another split or recipe never
    reuses stale weights. The returned model is in eval mode with gradients disabled.
    """
    images = torch.as_tensor(train_images).detach().cpu()
    if not isinstance(train_labels, torch.Tensor):
        train_labels = torch.as_tensor(np.asarray(train_labels))
    labels = train_labels.detach().cpu().to(torch.int64).flatten()
    _check_training_data(images, labels, levels)
    classes = torch.unique(labels)
    if not 2 <= len(classes) <= MAX_CLASSES:
        return None
    side = side or classifier_side(images.shape[-1])
    path = _cache_dir(cache_dir) / f"classifier-{_cache_key(images, labels, levels, side)}.pt"
    model = _load_cached(path)
    if model is None:
        # Labels become class indices 0..K-1 in sorted order (digits' 0..9 stay themselves).
        index = torch.searchsorted(classes, labels)
        model = _train_classifier(images, index, levels, side, len(classes))
        _save_atomic(model, path)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, levels: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"train_images must be N x C x H x W, got {tuple(images.shape)}")
    if images.shape[0] != labels.numel():
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    if images.is_floating_point() or images.dtype == torch.bool:
        raise TypeError(f"train_images must hold integer levels 0..{levels - 1}, got dtype {images.dtype}")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= levels):
        raise ValueError(f"train_images values must lie in 0..{levels - 1}")


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("DDPM_ENGINE_CACHE") or Path.home() / ".cache" / "ddpm_engine"
    return Path(cache_dir).expanduser()


def _cache_key(images: torch.Tensor, labels: torch.Tensor, levels: int = 17, side: int = _SIDE) -> str:
    # The content of the training split rather than data.split_digest: the classifier depends
    # on the images and labels only (not on how the held-out part was drawn), and labels are
    # not in the split digest. Canonical uint8/int64 bytes plus the shape, so the same pixels
    # given with another integer dtype hit the same entry, and a reshaped array does not.
    h = hashlib.sha256(CLASSIFIER_VERSION.encode())
    h.update(str((tuple(images.shape), levels, side)).encode())
    h.update(images.to(torch.uint8).contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _load_cached(path: Path) -> ImageClassifier | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != CLASSIFIER_VERSION:
            return None
        model = ImageClassifier(**payload["shape"])
        model.load_state_dict(payload["state_dict"])
        return model
    except Exception:  # noqa: BLE001 - a corrupt or foreign file is a miss: retrain
        return None


def _save_atomic(model: ImageClassifier, path: Path) -> None:
    # Write to a temp file in the same directory, then os.replace: concurrent runs either
    # see the old state or the complete new file, never a half-written one.
    shape = {"in_channels": model.in_channels, "side": model.side, "num_classes": model.num_classes}
    payload = {"version": CLASSIFIER_VERSION, "shape": shape, "state_dict": model.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _epochs(count: int) -> int:
    """30 epochs on digits' 1,617 images (48,500 image passes, about 3 s); larger sets get
    about _IMAGES_SEEN passes, at least _MIN_EPOCHS: Fashion-MNIST's 60,000 at 16x16 train 3
    epochs, about a minute on one core."""
    return min(_EPOCHS, max(_MIN_EPOCHS, math.ceil(_IMAGES_SEEN / count)))


def _train_classifier(
    images: torch.Tensor, labels: torch.Tensor, levels: int, side: int, num_classes: int
) -> ImageClassifier:
    """Deterministic training: fixed seed, private RNG state, a few epochs of Adam on CPU.

    Runs on one intra-op thread: parallel reductions sum in a thread-count-dependent order,
    and over hundreds of steps that round-off grows into visibly different weights. For a
    model this small one thread is also faster than contending for shared cores.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(images, labels, levels, side, num_classes)
    finally:
        torch.set_num_threads(previous_threads)


def _train_single_thread(
    images: torch.Tensor, labels: torch.Tensor, levels: int, side: int, num_classes: int
) -> ImageClassifier:
    channels = images.shape[1]
    x = _to_native(images.to(torch.float32) / (levels - 1) * 2.0 - 1.0, channels, side)
    # fork_rng: the caller's global RNG stream is unchanged by building this model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = ImageClassifier(channels, side, num_classes)
    gen = torch.Generator().manual_seed(_SEED)
    steps_per_epoch = math.ceil(len(x) / _BATCH)
    epochs = _epochs(len(x))
    opt = torch.optim.Adam(model.parameters(), lr=_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), _BATCH):
            idx = order[i : i + _BATCH]
            loss = F.cross_entropy(model(_augment(x[idx], gen, model)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def _augment(x: torch.Tensor, gen: torch.Generator, model: ImageClassifier) -> torch.Tensor:
    """Random +-1 pixel shifts, resize round trips and mild additive noise.

    Generated images are slightly off-centre and never exactly on the data's grey levels, and
    images trained at image_size > side come back to side x side through an up- then
    down-sampling that blurs them. A classifier that has only seen the clean grid is brittle
    on such inputs, which would make the features (and so the FD) depend on the image size.
    """
    side = model.side
    if torch.rand((), generator=gen) < _ROUND_TRIP_P:
        factor = _ROUND_TRIP_FACTORS[int(torch.randint(len(_ROUND_TRIP_FACTORS), (), generator=gen))]
        big = round(side * factor)
        up = F.interpolate(x, size=(big, big), mode="bilinear", align_corners=False)
        x = model.to_native(up)
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # -1, the darkest level: the background of digits and clothes
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(side))[:, None, :, None]  # N x 1 x side x 1
    cols = (dx[:, None] + torch.arange(side))[:, None, None, :]  # N x 1 x 1 x side
    chans = torch.arange(x.shape[1])[None, :, None, None]
    shifted = padded[torch.arange(n)[:, None, None, None], chans, rows, cols]
    noise = 0.05 * torch.randn(shifted.shape, generator=gen)
    return (shifted + noise).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------
# Sample quality
# ---------------------------------------------------------------------------------------


def sample_quality(
    samples: torch.Tensor,
    reference: torch.Tensor,
    classifier: ImageClassifier | None = None,
    levels: int = 256,
) -> dict[str, float]:
    """Quality of `samples` (N x C x H x W in [-1, 1]) against `reference` (M x C x H x W),
    both seen as images with ``levels`` grey levels (17 for digits, 256 for 8-bit images).

    With a classifier (labelled data, K classes):
      - fd: Frechet distance (Heusel et al. 2017) between the classifier's 64-dim
        penultimate features of samples and of reference.
      - coverage: fraction of the K classes that are the argmax prediction of at least
        max(1, round(0.2 * N / K)) samples, i.e. of at least 20% of a class's fair share.
        A model that collapses onto k classes scores about k/K; the 20% floor keeps a
        class from counting as covered because of one or two stray samples.
      - class_entropy: entropy in bits of the predicted-class histogram (log2(10) = 3.32
        for a uniform spread over 10 classes, 0 when every sample gets the same class).
      - confidence: mean maximum softmax probability; blurry or off-class samples score low.
    Without a classifier (unlabelled data):
      - fd: Frechet distance in pixel space of images downsampled (antialiased bilinear)
        to at most 8x8 per channel, i.e. at most 64*C dimensions; coverage, class_entropy
        and confidence are NaN.
    Always:
      - pixel_mean_gap: mean pixel of samples minus mean pixel of reference.
      - sat_frac / ref_sat_frac: fraction of sample / reference pixels at the lowest or highest
        level after mapping to the data's levels (round, clip), and sat_gap, their difference;
        the same split by end: sat_low_* (the lowest level, black) and sat_high_* (white).
      - brightness_std / ref_brightness_std: the spread of per-image mean brightness
        (``brightness_spread``) of samples and reference, and brightness_std_gap, their difference.

    Tensors may live on any device; the classifier runs on its own device and all
    statistics are computed on CPU in float64.
    """
    _check_images(samples, "samples")
    _check_images(reference, "reference")
    out: dict[str, float] = {}
    if classifier is not None:
        feat_s, logits_s = _classify(classifier, samples)
        feat_r, _ = _classify(classifier, reference)
        out["fd"] = _fd_between(feat_s, feat_r)
        out.update(_class_metrics(logits_s))
    else:
        out["fd"] = _fd_between(_pixel_features(samples), _pixel_features(reference))
        out.update(coverage=math.nan, class_entropy=math.nan, confidence=math.nan)
    out.update(_pixel_metrics(samples, reference, levels))
    return out


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be an N x C x H x W tensor")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {x.shape[0]}")


@torch.no_grad()
def _classify(model: ImageClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits on CPU, computed in batches to bound memory."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, logits = [], []
    for chunk in x.split(_EVAL_BATCH):
        f = model.features(chunk.to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def _fd_between(a: torch.Tensor, b: torch.Tensor) -> float:
    mu_a, cov_a = feature_statistics(a)
    mu_b, cov_b = feature_statistics(b)
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


def _class_metrics(logits: torch.Tensor) -> dict[str, float]:
    logits = logits.to(torch.float64)
    if not torch.isfinite(logits).all():
        # A diverged sampler: argmax of NaN would silently vote for class 0.
        return {"coverage": math.nan, "class_entropy": math.nan, "confidence": math.nan}
    n = logits.shape[0]
    classes = logits.shape[1]
    counts = torch.bincount(logits.argmax(dim=1), minlength=classes).to(torch.float64)
    # Round half up explicitly (Python's round() is banker's rounding).
    threshold = max(1, math.floor(_COVERAGE_SHARE * n / classes + 0.5))
    p = counts / n
    nz = p[p > 0]
    return {
        "coverage": float((counts >= threshold).to(torch.float64).mean()),
        "class_entropy": float(-(nz * torch.log2(nz)).sum()) + 0.0,  # +0.0 turns -0.0 into 0.0
        "confidence": float(torch.softmax(logits, dim=1).amax(dim=1).mean()),
    }


def _pixel_features(x: torch.Tensor) -> torch.Tensor:
    """Images downsampled to at most 8x8 (antialiased), flattened: N x (C*h*w)."""
    x = x.detach().to("cpu", torch.float32)
    h, w = min(x.shape[-2], _SIDE), min(x.shape[-1], _SIDE)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(1)


def _pixel_metrics(samples: torch.Tensor, reference: torch.Tensor, levels: int) -> dict[str, float]:
    """Saturation as a viewer sees it: both sets mapped to the data's ``levels`` (round,
    clip), then the fraction of pixels at the lowest or highest level. A threshold such as
    |x| >= 0.99 would sit far inside one grey level (half a level is 1/16 on digits)."""
    s = samples.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    (low, high), (ref_low, ref_high) = (extreme_fractions(x, levels) for x in (s, r))
    # On data with a black background most saturated pixels are background: the two ends
    # apart say "too dark at the background" and "too bright at the foreground" separately.
    spread, ref_spread = brightness_spread(s), brightness_spread(r)
    return {
        "pixel_mean_gap": float(s.mean() - r.mean()),
        "brightness_std": spread,
        "ref_brightness_std": ref_spread,
        "brightness_std_gap": spread - ref_spread,
        "sat_frac": low + high,
        "ref_sat_frac": ref_low + ref_high,
        "sat_gap": (low + high) - (ref_low + ref_high),
        "sat_low_frac": low,
        "ref_sat_low_frac": ref_low,
        "sat_low_gap": low - ref_low,
        "sat_high_frac": high,
        "ref_sat_high_frac": ref_high,
        "sat_high_gap": high - ref_high,
    }


def brightness_spread(images: torch.Tensor) -> float:
    """Std over images (n - 1 in the denominator) of each image's mean pixel, in model space
    and unclipped: how much the images differ in overall brightness. Sampled from N(0, I), a
    schedule whose x_T still holds part of x_0 starts every chain from a middling image's x_T,
    and its samples crowd around medium brightness (Lin et al. 2023): their spread falls below
    the data's. NaN for fewer than two images."""
    means = images.detach().to("cpu", torch.float64).flatten(1).mean(dim=1)
    return float(means.std()) if len(means) >= 2 else math.nan


def to_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Model-space pixels ([-1, 1]) as the integer level a viewer sees: round, then clip."""
    return ((x + 1) * (levels - 1) / 2).round().clamp(0, levels - 1)


def saturated_fraction(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Fraction of pixels at the lowest or highest of ``levels`` after quantization."""
    q = to_levels(x, levels)
    return ((q == 0) | (q == levels - 1)).to(torch.float64).mean()


def extreme_fractions(x: torch.Tensor, levels: int) -> tuple[float, float]:
    """(fraction of pixels at the lowest level, fraction at the highest) after quantization."""
    q = to_levels(x, levels)
    return float((q == 0).to(torch.float64).mean()), float((q == levels - 1).to(torch.float64).mean())


def nearest_distances(queries: torch.Tensor, pool: torch.Tensor, chunk: int = 256, k: int = 1) -> torch.Tensor:
    """For each query image, the RMS pixel distances (L2 / sqrt(D), in pixel units of [-1, 1])
    to its ``k`` nearest images in ``pool``, nearest first: len(queries) x k, float64 (a vector
    for k = 1), chunked so memory stays at chunk x len(pool)."""
    q = queries.reshape(len(queries), -1).to("cpu", torch.float64)
    p = pool.reshape(len(pool), -1).to("cpu", torch.float64)
    p_sq = (p * p).sum(1)
    out = []
    for lo in range(0, len(q), chunk):
        block = q[lo : lo + chunk]
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, clamped: rounding can dip below 0
        d2 = (block * block).sum(1, keepdim=True) - 2 * block @ p.T + p_sq
        out.append(d2.clamp_min(0).topk(k, dim=1, largest=False).values)
    distances = (torch.cat(out) / q.shape[1]).sqrt()
    return distances[:, 0] if k == 1 else distances


# The ratio test of memorisation (Carlini et al. 2023, "Extracting Training Data from Diffusion
# Models", sec. 5: a generation counts as extracted when it is much closer to one training
# image than to the training set's other images near it). A sample is memorised when its
# nearest training image is closer than MEMORISED_RATIO times the second nearest (RMS pixel
# distances). Why 1/3: a copy of a training image with a little noise has d1 near 0 and
# passes; an image between training images does not: the even blend of two has d1 = d2 (ratio
# 1), a digit shifted by one pixel is about as far from its source as from other training
# digits, and a new sample from the data's distribution sits among them (held-out digits:
# ratios from 0.55 to 1, 5% below 0.71; shifted digits 0.71 to 1). Why not nn_train_dist alone: a distance says nothing
# without the spacing of the training set around the sample, which the second neighbour gives.
MEMORISED_RATIO = 1.0 / 3.0


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor) -> dict[str, float]:
    """Does the model copy its training set?

    memorised_frac: the fraction of samples whose nearest training image is closer than
    MEMORISED_RATIO x the second nearest (RMS pixel distance), the ratio test after Carlini et
    al. 2023: near 1 for copies, near 0 for new images, blends and shifted copies.
    nn_train_dist: mean RMS distance of each sample to its nearest training image.
    nn_heldout_ratio: nn_train_dist over the same mean for held-out images. Near 0 it says the
    samples sit on training images; near or above 1 it says only that they are as far from the
    training set as unseen data are, which shifted or blended training images and smooth
    Gaussian-like samples also are (on digits: 2.05, 1.32 and 1.70), so it is no evidence of
    generalising."""
    nearest = nearest_distances(samples, train, k=2) if len(train) >= 2 else None
    to_train = float(nearest_distances(samples, train).mean())
    heldout_to_train = float(nearest_distances(heldout, train).mean())
    if nearest is None:  # one training image: no second neighbour to compare with
        memorised = math.nan
    else:
        memorised = float((nearest[:, 0] < MEMORISED_RATIO * nearest[:, 1]).to(torch.float64).mean())
    return {
        "memorised_frac": memorised,
        "nn_train_dist": to_train,
        "nn_heldout_ratio": to_train / heldout_to_train if heldout_to_train > 0 else math.nan,
    }
