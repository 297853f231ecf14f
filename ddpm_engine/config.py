"""Typed experiment configuration: every ablation knob, its default, range and meaning.

The config is a tree of pydantic models with ``extra="forbid"`` so that a misspelt key is an
error rather than a silently ignored setting. Each field's ``description`` is its
documentation; ``harness`` reuses these models to validate study files, so the rules here
are the rules there.
"""

from __future__ import annotations

import hashlib
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .metrics import MEASURE_VERSION, REFERENCE_NAMES

MAX_SEED = 2**32 - 1  # the range numpy's and torch's generators accept everywhere


def _mentions(annotation, kinds: tuple) -> bool:
    """Whether a field's type is, or holds, one of ``kinds`` (``int | None``, ``list[int]``)."""
    if annotation in kinds:
        return True
    return any(
        _mentions(arg, kinds) for arg in typing.get_args(annotation) if isinstance(arg, type) or typing.get_args(arg)
    )


def _has_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(_has_bool(v) for v in value)


def later_knob(default: Any, **kwargs: Any) -> Any:
    """A field added after run keys were first recorded. While it is at its default it is left
    out of the run key and the train key (ExperimentConfig.key_dict), so adding a knob keeps
    every finished run's key: runs are found, not trained again. Every field added from now on
    is declared with this (docs/design.md, "Run keys")."""
    return Field(default, json_schema_extra={"key_omit_at_default": True}, **kwargs)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info: ValidationInfo):
        # pydantic's lax mode reads True as 1 and False as 0: `steps: true` or `--set
        # train.steps=true` would silently train one step instead of saying it is wrong
        annotation = cls.model_fields[info.field_name].annotation
        if _has_bool(value) and _mentions(annotation, (int, float)) and not _mentions(annotation, (bool, Any)):
            raise ValueError("a boolean is not a number here")
        return value


class DataConfig(_Section):
    name: Literal["digits", "fashion_mnist", "mnist", "image_folder", "npz", "torchvision"] = Field(
        "digits",
        description="digits: scikit-learn load_digits (1,797 8x8 images, 17 grey levels, "
        "embedded). fashion_mnist / mnist: the four IDX files of the set (70,000 28x28 images, "
        "256 grey levels, 10 classes), their own 60,000 / 10,000 train / test split. "
        "image_folder: a folder of PNG/JPEG images. npz: an array file. "
        "torchvision: a torchvision data set already on disk.",
    )
    path: str | None = Field(
        None,
        description="Folder (image_folder), .npz file (npz), root folder (torchvision) or folder of the IDX "
        "files (fashion_mnist: /usr/share/datasets/fashion-mnist, where the Debian package "
        "dataset-fashion-mnist puts them, if unset; mnist: required).",
    )
    npz_key: str | None = Field(None, description="Array name inside the .npz file; None takes the first array.")
    torchvision_set: str | None = Field(None, description="torchvision.datasets class name, e.g. MNIST or CIFAR10.")
    image_size: int | None = Field(
        None, ge=4, le=1024, description="Square side to resize to; None keeps the native size."
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 converts to grey, 3 to RGB; None keeps what the data has."
    )
    levels: int | None = Field(
        None,
        ge=2,
        le=65536,
        description="Quantization levels of a pixel (17 for digits, 256 for 8-bit images); "
        "None takes the data set's own. Used by the L0 decoder and bits/dim.",
    )
    heldout_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Fraction of images held out from training. Does not apply to fashion_mnist / mnist: "
        "their test split is the held-out set.",
    )
    split_seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the fixed train / held-out split (independent of train.seed); for fashion_mnist / "
        "mnist it only orders each split and picks the max_images subset.",
    )
    max_images: int | None = Field(
        None,
        ge=2,
        description="Use at most this many images (after a seeded shuffle). fashion_mnist / mnist: a cap on "
        "both splits together, each keeping its share (6 training to 1 held out).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where decoded, resized image folders are cached as uint8 arrays; "
        "None uses $DDPM_ENGINE_CACHE or ~/.cache/ddpm_engine.",
    )


# Presets fill every model knob the user left unset. `tiny` is the seed's first run (about
# 0.5M parameters, no attention, one shared time MLP); `annotated` follows the annotated
# diffusion UNet at about 50M (per-block time MLPs, attention at low resolution).
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(
        base_channels=24,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        attention_heads=4,
        time_mlp="shared",
        time_embed_dim=192,
        norm_groups=8,
        dropout=0.0,
    ),
    "annotated": dict(
        base_channels=120,
        channel_mults=(1, 2, 4),
        num_res_blocks=2,
        attention_resolutions=(4, 2),
        attention_heads=4,
        time_mlp="per_block",
        time_embed_dim=480,
        norm_groups=8,
        dropout=0.0,
    ),
}


class ModelConfig(_Section):
    preset: Literal[("tiny", "annotated", *REFERENCE_NAMES)] = Field(
        "tiny",
        description="tiny / annotated fill every knob below that is left unset. pixelwise, gaussian, empirical, "
        "median: a parameter-free reference denoiser fitted on the training split (ddpm_engine.references), "
        "never trained (train.steps do not apply); the knobs below are ignored.",
    )
    base_channels: int | None = Field(None, ge=4, description="Channels of the first level.")
    channel_mults: tuple[int, ...] | None = Field(
        None, min_length=1, description="Channel multiplier per resolution level."
    )
    num_res_blocks: int | None = Field(None, ge=1, description="Residual blocks per level.")
    attention_resolutions: tuple[int, ...] | None = Field(
        None, description="Feature-map sides (e.g. 4) at which self-attention is applied."
    )
    attention_heads: int | None = Field(None, ge=1, description="Heads of each attention layer.")
    time_mlp: Literal["shared", "per_block"] | None = Field(
        None,
        description="shared: one MLP embeds t, each block projects it linearly. "
        "per_block: every residual block has its own MLP from the sinusoidal embedding.",
    )
    time_embed_dim: int | None = Field(None, ge=4, description="Width of the time embedding.")
    norm_groups: int | None = Field(None, ge=1, description="GroupNorm groups.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Dropout in residual blocks.")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> ModelConfig:
        if self.preset not in MODEL_PRESETS:  # a reference denoiser has no network knobs
            return self
        for key, value in MODEL_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        return self


class DiffusionConfig(_Section):
    T: int = Field(1000, ge=2, le=100_000, description="Number of diffusion steps.")
    schedule: Literal["linear", "cosine"] = Field("linear", description="Beta schedule.")
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="Linear schedule: beta_1.")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="Linear schedule: beta_T.")
    beta_scaling: Literal["none", "by_T"] = Field(
        "none",
        description="none keeps beta_start..beta_end whatever T is (annotated-diffusion "
        "notebook); by_T multiplies both by 1000/T so that terminal SNR stays near 0.",
    )
    cosine_s: float = Field(0.008, ge=0.0, lt=1.0, description="Cosine schedule offset s.")
    max_beta: float = Field(0.999, gt=0.0, lt=1.0, description="Cosine schedule: cap on each beta_t.")
    sigma: Literal["beta", "beta_tilde"] = Field(
        "beta",
        description="Reverse-process variance: beta_t or the posterior beta_tilde_t (DDPM 3.2).",
    )
    zero_terminal_snr: bool = later_knob(
        False,
        description="Rescale the betas so that alphabar_T = 0 exactly (Lin et al. 2023, Alg. 1): sqrt(alphabar_t) "
        "shifted and scaled so that its last value is 0 and its first unchanged, so x_T is pure noise whatever T "
        "and the schedule (beta_T becomes 1). Needs objective.prediction v (as Lin et al. use) or x0: from a "
        "predicted eps, x_0 = (x_T - eps) / sqrt(alphabar_T) is 0/0 at t = T, so eps with this is an error before "
        "anything runs.",
    )

    @model_validator(mode="after")
    def _ordered_betas(self) -> DiffusionConfig:
        if self.schedule == "linear" and self.beta_start > self.beta_end:
            raise ValueError("beta_start must not exceed beta_end")
        return self


class ObjectiveConfig(_Section):
    loss: Literal["mse", "huber"] = Field("mse", description="Distance between noise and its prediction.")
    huber_delta: float = Field(1.0, gt=0.0, description="Huber loss threshold.")
    weighting: Literal["simple", "vlb"] = Field(
        "simple",
        description="simple: L_simple (DDPM eq. 14). vlb: keep the DDPM weights "
        "w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alphabar_t)) (eq. 12).",
    )
    l0_term: bool = Field(
        False,
        description="Rows sampled at t=1 use the discretized Gaussian decoder NLL L_0 "
        "(DDPM eq. 13) instead of the noise loss.",
    )
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR-gamma weighting (Hang et al. 2023); None is off."
    )
    t_sampling: Literal["uniform", "importance"] = Field(
        "uniform",
        description="importance: sample t with probability proportional to the root mean "
        "square of its recent losses (Improved DDPM sec. 3.3).",
    )
    importance_history: int = Field(10, ge=1, description="Losses kept per t for importance sampling.")
    noise_clip: float | None = Field(
        None, gt=0.0, description="Clip the Gaussian noise to [-c, c] in training and sampling."
    )
    input_perturbation: float = later_knob(
        0.0,
        ge=0.0,
        lt=1.0,
        description="DDPM-IP (Ning et al. 2023): the network's training input is x_t built with eps + "
        "gamma xi (xi a fresh standard normal draw) while the target stays eps, so it sees inputs a "
        "little off q(x_t) as the sampling chain gives it; 0 is off (training exactly as before). "
        "Ning et al. use 0.1 (0.15 on CIFAR-10).",
    )
    prediction: Literal["eps", "x0", "v"] = later_knob(
        "eps",
        description="What the model's output is read as: eps (the noise, DDPM), x0 (the clean image) or v = "
        "sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x_0 (Salimans & Ho 2022 sec. 4). The training loss is the "
        "distance to that target (loss, huber_delta); weighting: simple weighs every t alike in the target's space, "
        "vlb keeps the DDPM eq. 12 weight converted to it (eps: w_t; x0: w_t SNR_t; v: w_t alphabar_t); "
        "min_snr_gamma takes Hang et al.'s form for the target (eps: min(SNR, g) / SNR; x0: min(SNR, g); v: "
        "min(SNR, g) / (SNR + 1)). Probes, the bound and the samplers convert the output to eps-hat and x0-hat "
        "(ddpm_engine.diffusion), so loss_mse and the eps statistics are the predicted noise's for every target.",
    )


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1, description="Optimizer steps (the budget when budget_by is steps).")
    budget_by: Literal["steps", "images", "seconds"] = Field(
        "steps",
        description="What is held equal across arms: steps, images seen (budget_images), or "
        "training wall-clock seconds (budget_seconds; not reproducible step for step).",
    )
    budget_images: int | None = Field(None, ge=1, description="Images to train on when budget_by is images.")
    budget_seconds: float | None = Field(
        None, gt=0, description="Training seconds (probes excluded) when budget_by is seconds."
    )
    batch_size: int = Field(128, ge=1, description="Images per step.")
    lr: float = Field(1e-3, gt=0.0, lt=1.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0, description="EMA decay of the weights; None disables EMA.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max gradient norm; None is off.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(25, ge=1, description="Steps between logged training scalars.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of initialisation, batches, t and noise.")
    # fp32 stays the default: a default is part of every run key, and bf16 on a CPU pays
    # off only with native bf16 and a big model (see device.auto_precision). Opt in with auto.
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="bf16 runs forward and backward under bf16 autocast; auto is bf16 "
        "on a CUDA GPU that supports it and, for a model of at least 5M parameters, on a CPU "
        "with bf16 in hardware (AVX512-BF16, AMX or ARM BF16); fp32 elsewhere (summary "
        "bf16_autocast says which ran).",
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    t_range: tuple[int, int] | None = later_knob(
        None,
        description="[lo, hi]: train on t in lo..hi only (1 <= lo <= hi <= diffusion.T; t is 1-based), "
        "uniformly or by objective.t_sampling within the range; the probes still cover every t. "
        "None trains on every t.",
    )

    @field_validator("t_range")
    @classmethod
    def _ordered_t_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError(f"[lo, hi] needs 1 <= lo <= hi (t is 1-based), got [{value[0]}, {value[1]}]")
        return value

    @model_validator(mode="after")
    def _budget_is_given(self) -> TrainConfig:
        if self.budget_by == "images" and self.budget_images is None:
            raise ValueError("budget_by: images needs train.budget_images")
        if self.budget_by == "seconds" and self.budget_seconds is None:
            raise ValueError("budget_by: seconds needs train.budget_seconds")
        return self

    def planned_steps(self) -> int | None:
        """Steps the budget allows, or None when it is wall-clock time."""
        if self.budget_by == "images":
            return -(-self.budget_images // self.batch_size)
        if self.budget_by == "seconds":
            return None
        return self.steps


class SampleConfig(_Section):
    sampler: Literal["ddpm", "ddim"] = Field(
        "ddpm", description="ddpm: ancestral sampling (DDPM Algorithm 2). ddim: Song et al. 2021."
    )
    steps: int | None = Field(None, ge=1, description="DDIM steps; None uses T. Ancestral sampling always takes T.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 deterministic, 1 ~ DDPM).")
    clip_x0: bool = Field(False, description="Clip the predicted x_0 to [-1, 1] at every step (then use eq. 7).")
    num_samples: int = Field(128, ge=1, description="Samples drawn at the end of training.")
    batch_size: int | None = Field(None, ge=1, description="Samples per forward pass; None sizes it for the device.")
    use_ema: bool = Field(True, description="Sample with the EMA weights (when EMA is on).")
    eps_scale: float = later_knob(
        1.0,
        gt=0.5,
        le=1.5,
        description="Epsilon Scaling (Ning et al. 2024): every sampling step uses the predicted noise "
        "divided by this constant (their uniform schedule), in the x_0 estimate and the step alike; "
        "1 is off. Above 1 it shrinks the noise the chain removes. Every chain of the run uses it.",
    )
    precision: Literal["fp32", "fp64"] = later_knob(
        "fp32",
        description="fp64 runs every sampling chain in float64, the model's forward included (a float64 "
        "copy of the sampled weights, no bf16 autocast while sampling), from the same x_T and z drawn "
        "in float32; training, probes and the bound stay as train.precision says. Not on MPS "
        "(no float64 there).",
    )
    seed: int = Field(
        1234,
        ge=0,
        le=MAX_SEED,
        description="Base seed of x_T and the sampling noise. Replicate s (train.seed = s) draws "
        "from replicate_seed(this, s): the same draw for every arm of a replicate (common random "
        "numbers), a different one per replicate (so seed-to-seed spread includes it).",
    )


class EvalConfig(_Section):
    probe_every: int = Field(500, ge=1, description="Steps between per-t probes (and at the end).")
    probe_timesteps: int = Field(40, ge=2, description="Timesteps in the probe grid (all t when T <= 200).")
    probe_images: int = Field(256, ge=1, description="Held-out images in each probe.")
    probe_seed: int = Field(
        4321,
        ge=0,
        le=MAX_SEED,
        description="Base seed of the probe noise, the drift reference's noise and the bound's "
        "strata; replicate s draws from replicate_seed(this, s), shared by every arm of it.",
    )
    drift_bins: int = Field(64, ge=2, description="Histogram bins of pixel values over [-1.5, 1.5].")
    drift_hist_steps: int = Field(
        50, ge=2, description="Reverse steps at which a histogram is recorded (evenly spaced)."
    )
    quality: bool = Field(True, description="Compute sample quality (Frechet distance, coverage).")
    quality_reference: Literal["split", "uncapped"] = later_knob(
        "split",
        description="What samples are compared with for fd, coverage, saturation and pixel_mean_gap: split, "
        "the run's own training split (and a classifier trained on it); uncapped, the training split of the "
        "same data without data.max_images, so arms of different max_images share one yardstick. "
        "memorised_frac and the nearest-neighbour distances stay against the run's own training images.",
    )


class ExperimentConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _t_range_within_T(self) -> ExperimentConfig:
        t_range = self.train.t_range
        if t_range is not None and t_range[1] > self.diffusion.T:
            # located at the key itself (not at the whole config): a study file's error names
            # train.t_range and its line
            error = PydanticCustomError(
                "t_range_beyond_T",
                "[lo, hi] must lie within 1..diffusion.T = {T}",
                {"T": self.diffusion.T},
            )
            details = InitErrorDetails(type=error, loc=("train", "t_range"), input=list(t_range))
            raise ValidationError.from_exception_data(type(self).__name__, [details])
        return self

    @model_validator(mode="after")
    def _x0_recoverable_at_T(self) -> ExperimentConfig:
        if self.diffusion.zero_terminal_snr and self.objective.prediction == "eps":
            raise ValueError(
                "prediction eps with diffusion.zero_terminal_snr: at alphabar_T = 0 a predicted eps says nothing "
                "of x_0 (x_0 = (x_T - eps) / sqrt(alphabar_T) is 0/0), so sampling and the bound cannot start; "
                "use prediction v (Lin et al. 2023 sec. 3.2) or x0"
            )
        return self

    @model_validator(mode="after")
    def _eps_scale_on_eps(self) -> ExperimentConfig:
        if self.sample.eps_scale != 1.0 and self.objective.prediction != "eps":
            # Epsilon Scaling divides the predicted noise; an x0 or v output would have to be
            # turned into eps and back, which at zero terminal SNR divides by 0
            raise ValueError(
                f"sample.eps_scale {self.sample.eps_scale} needs objective.prediction eps "
                f"(Ning et al. 2024 scale an eps model), not {self.objective.prediction}"
            )
        return self

    def to_dict(self) -> dict:
        """The fully resolved config as plain JSON types."""
        return self.model_dump(mode="json")

    @property
    def sample_draw_seed(self) -> int:
        """Seed of this replicate's x_T and sampling noise (docs/design.md, "Evaluation draws")."""
        return replicate_seed(self.sample.seed, self.train.seed)

    @property
    def probe_draw_seed(self) -> int:
        """Seed of this replicate's probe noise (and, offset, the drift reference and bound strata)."""
        return replicate_seed(self.eval.probe_seed, self.train.seed)

    def key_dict(self) -> dict:
        """The config as its run key sees it: to_dict() without the later knobs (later_knob)
        that are at their default, so a config written before a knob existed keeps its key."""
        out = self.to_dict()
        for section_name in type(self).model_fields:
            section = getattr(self, section_name)
            for name, field in type(section).model_fields.items():
                extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
                if extra.get("key_omit_at_default") and getattr(section, name) == field.get_default(
                    call_default_factory=True
                ):
                    del out[section_name][name]
        return out

    def training_dict(self) -> dict:
        """What determines the trained weights, as keys see it (key_dict): the config without
        `sample` and `eval`, which only say how the weights are measured. Arms equal here share
        one training."""
        return {k: v for k, v in self.key_dict().items() if k not in MEASUREMENT_SECTIONS}

    def probe_signature(self) -> str:
        """What the final probe depends on besides the weights: a checkpoint whose final probe
        was taken under another signature (other probe settings, another replicate's draw, an
        older MEASURE_VERSION) is probed again before it is measured."""
        probe = {k: v for k, v in self.eval.model_dump(mode="json").items() if k != "probe_every"}
        return json.dumps({"version": MEASURE_VERSION, "eval": probe, "draw": self.probe_draw_seed}, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        return cls.model_validate(values)


# Config sections that change how a run is measured but not what it trains.
MEASUREMENT_SECTIONS = ("sample", "eval")


def replicate_seed(base: int, replicate: int) -> int:
    """The evaluation draw of replicate ``replicate`` from a base seed: 32 bits of sha256 over
    both, so replicates get unrelated streams (not base + s, whose neighbouring streams
    another base seed would reuse) and every arm of one replicate gets the same one."""
    digest = hashlib.sha256(f"{int(base)}/{int(replicate)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def field_docs(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> description for every leaf field (for --help and docs)."""
    docs: dict[str, str] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            docs.update(field_docs(annotation, key + "."))
        else:
            docs[key] = info.description or ""
    return docs
