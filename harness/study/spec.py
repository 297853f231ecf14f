"""Study files: YAML -> validated Study, with every error naming file, line and key path.

The engine's pydantic config is the schema of `base` and of every override, so the rules
of a study file are exactly the engine's rules. Validation stops at the first problem and
reports it as one line: ``studies/x.yaml:12: ablations.timesteps.T200.diffusion.T: ...``.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import os
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ddpm_engine import metrics
from ddpm_engine.config import MAX_SEED, ExperimentConfig, field_docs

ENGINE_KEYS = sorted(field_docs())  # every dotted leaf key of the engine config
# pydantic's lax int reads `true` as 1: `seeds: [true]` would silently run seed 1
Int = Annotated[int, Strict()]


class StudyError(Exception):
    """A problem in a study file or a --set override, located by file, line and key path."""

    def __init__(self, source: str, line: int | None, key: str, message: str):
        self.source, self.line, self.key, self.message = source, line, key, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class Distribution(BaseModel):
    """One search dimension: exactly one of loguniform / uniform / int / choice."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    integer: tuple[Int, Int] | None = Field(None, alias="int")
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "integer", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of loguniform: [lo, hi], uniform: [lo, hi], int: [lo, hi], choice: [...]"
            )
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
        else:
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} needs lo < hi, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError("loguniform needs lo > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "integer", "choice") if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """Values to validate against the engine config before anything runs."""
        return list(self.choice) if self.kind == "choice" else list(getattr(self, self.kind))


class Tune(BaseModel):
    """Per-arm hyperparameter search before the seed replicates (Optuna TPE + pruning)."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, Distribution] = Field(min_length=1, description="dotted engine key -> distribution")
    trials: Int = Field(8, ge=1, le=1000, description="Trials per arm.")
    metric: str = Field("heldout_loss", description="Summary metric of a trial to optimise.")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: the metric's declared direction (a gap: minimise its absolute value)."
    )
    steps: Int | None = Field(None, ge=1, description="Shortened train.steps of each trial.")
    seed: Int = Field(0, ge=0, description="Training seed of the trials and of the TPE sampler.")

    @property
    def resolved_direction(self) -> str:
        return self.direction or metrics.per_run_metric(self.metric).direction or "minimize"

    def objective(self, summary: dict) -> float:
        """The number a trial reports: the metric, or its absolute value for a signed gap
        (tuning a gap toward zero, never toward ever darker samples)."""
        return metrics.per_run_metric(self.metric).objective(float(summary.get(self.metric, float("nan"))))


class Hypothesis(BaseModel):
    """A claim about one per-run metric, judged on the study's finished runs (docs/design.md)."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="Any declared per-run metric (the `quality` table).")
    arm: str | None = Field(None, description="One arm label; omitted: every arm.")
    versus: Literal["baseline", "none"] = Field(
        "none", description="baseline: the per-seed paired difference arm - baseline; none: the arm's own value."
    )
    expect: Literal["above", "below", "within"] = Field(description="Where the 95% CI should lie.")
    value: float = Field(0.0, description="Threshold; for `within`, the margin +-value.")

    @field_validator("value", mode="before")
    @classmethod
    def _no_bool(cls, value):
        # lax float reads `true` as 1.0: a threshold typed as a boolean is a mistake, not 1
        if isinstance(value, bool):
            raise ValueError("a boolean is not a number here")
        return value

    says: str = Field("", description="The claim in plain words, shown in the report.")

    @model_validator(mode="after")
    def _margin(self) -> Hypothesis:
        if not math.isfinite(self.value):
            raise ValueError("value must be a finite number")
        if self.expect == "within" and not self.value > 0:
            raise ValueError("within needs a margin value > 0")
        return self


def scale_problem(hypothesis: Hypothesis, scale: str | None = None) -> str | None:
    """Why a hypothesis cannot be stated on its metric's log scale, or None.

    A log-scale metric (ddpm_engine.metrics: positive and skewed) is judged on log values: its
    own value against a positive threshold, or the ratio arm / baseline, which is above or
    below 1 (value 0) or within a factor 1 + m of it (``within m``)."""
    if scale is None:
        declared = metrics.PER_RUN.get(hypothesis.metric)
        scale = declared.scale if declared is not None else "linear"
    if scale != "log":
        return None
    name = hypothesis.metric
    if hypothesis.versus == "none":
        if hypothesis.expect == "within":
            return (
                f"{name} is positive and judged on a log scale: `within` a margin around 0 says nothing "
                "of it; state `below` (or `above`) a value > 0"
            )
        if not hypothesis.value > 0:
            return f"{name} is positive and judged on a log scale: the threshold must be > 0, got {hypothesis.value:g}"
        return None
    if hypothesis.expect != "within" and hypothesis.value != 0:
        return (
            f"{name} is compared with the baseline as a ratio arm/baseline (log scale): `{hypothesis.expect}` "
            f"takes value 0 (a ratio of 1), got {hypothesis.value:g}; to bound the ratio's size use "
            "`within m` (ratio between 1/(1+m) and 1+m)"
        )
    return None


class AdaptiveSeeds(BaseModel):
    """``seeds: {start: 3, max: 8}``: every arm runs ``start`` seeds, then arms whose hypotheses
    are still undecided get ``batch`` more at a time, up to ``max`` (harness.study.sequential)."""

    model_config = ConfigDict(extra="forbid")

    start: Int = Field(ge=2, le=64, description="Seeds every arm runs first (2 at least: one seed has no interval).")
    max: Int = Field(ge=2, le=64, description="Most seeds an arm may get.")
    batch: Int = Field(1, ge=1, le=64, description="Seeds added to an undecided arm at each look.")
    first: Int = Field(0, ge=0, le=MAX_SEED - 64, description="The seeds are first, first + 1, ..., first + max - 1.")

    @model_validator(mode="after")
    def _order(self) -> AdaptiveSeeds:
        if self.max < self.start:
            raise ValueError(f"max ({self.max}) must be at least start ({self.start})")
        return self

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first, self.first + self.max))

    @property
    def looks(self) -> list[int]:
        """The seed counts at which hypotheses are judged: start, start + batch, ..., max."""
        return [*range(self.start, self.max, self.batch), self.max]


# A list, or a mapping for adaptive seeds; the tags keep pydantic's error paths readable
# (located_error drops them).
SeedsField = Annotated[
    Annotated[list[Annotated[Int, Field(ge=0, le=MAX_SEED)]], Tag("tag-list")]
    | Annotated[AdaptiveSeeds, Tag("tag-adaptive")],
    Discriminator(lambda value: "tag-adaptive" if isinstance(value, (dict, AdaptiveSeeds)) else "tag-list"),
]


class Study(BaseModel):
    """The schema of a study file (docs/design.md, "Study files")."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,  # a folder name and an MLflow experiment name: file systems stop at 255 bytes
        description="Name of the study (folder and MLflow experiment).",
    )
    question: str = Field(min_length=1, description="The question the study answers.")
    base: dict[str, Any] = Field(default_factory=dict, description="Engine config shared by every arm.")
    ablations: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="axis -> level name -> {dotted.key: value} overrides."
    )
    design: Literal["factorial", "one_at_a_time"] = Field("factorial", description="How levels combine.")
    baseline: dict[str, str] | None = Field(None, description="axis -> level of the baseline arm.")
    arms: dict[str, dict[str, str]] | None = Field(
        None, description="Explicit arms: name -> {axis: level}; axes left out take the baseline level."
    )
    seeds: SeedsField = Field(
        default_factory=lambda: [0],
        description="Training seeds of every arm: a list, or {start, max, batch, first} for adaptive seeds.",
    )
    tune: Tune | None = Field(None, description="Tune each arm before its seed replicates.")
    hypotheses: dict[str, Hypothesis] = Field(
        default_factory=dict,
        description="name -> a claim judged on the finished runs (supported / refuted / inconclusive).",
    )

    # Filled by load_study: the source path and where each key sits, for error messages.
    source: str = Field("", exclude=True)
    lines: dict[tuple, int] = Field(default_factory=dict, exclude=True, repr=False)
    set_keys: list[str] = Field(default_factory=list, exclude=True, repr=False)  # given with --set: no line

    @property
    def seed_list(self) -> list[int]:
        """Every seed an arm may run (for adaptive seeds, up to ``max``)."""
        return self.seeds.seeds if isinstance(self.seeds, AdaptiveSeeds) else list(self.seeds)

    @property
    def adaptive(self) -> AdaptiveSeeds | None:
        return self.seeds if isinstance(self.seeds, AdaptiveSeeds) else None

    def line_of(self, path: tuple) -> int | None:
        """The line of the longest prefix of ``path`` that has one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def error(self, path: tuple, message: str) -> StudyError:
        return StudyError(self.source, self.line_of(path), format_path(path), message)


def format_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------- YAML with line numbers


def _compose_lines(text: str, source: str) -> dict[tuple, int]:
    """Map each key path to its 1-based line; duplicate keys are errors (YAML would keep
    the last silently, hiding e.g. two levels with the same name)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise StudyError(
                        source,
                        line,
                        format_path(path + (key,)),
                        f"duplicate key {key!r} (first defined on line {seen[key]})",
                    )
                seen[key] = line
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if node is not None:
        walk(node, ())
    return lines


MAX_NODES = 100_000  # a study file is a few hundred nodes; aliases must not expand past this
MAX_DEPTH = 100


def _expanded_size(node, memo: dict, depth: int = 0) -> int:
    """Nodes the document expands to, counting an aliased node at every use: a few hundred
    bytes of nested aliases ("billion laughs") expand to billions, so this is checked on the
    composed graph (shared nodes, linear cost) before anything is constructed."""
    if depth > MAX_DEPTH:
        raise RecursionError
    if id(node) in memo:
        return memo[id(node)]
    children = node.value if isinstance(node.value, list) else []
    flat = [c for pair in children for c in (pair if isinstance(pair, tuple) else (pair,))]
    memo[id(node)] = size = 1 + sum(_expanded_size(child, memo, depth + 1) for child in flat)
    return size


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise StudyError(
                source,
                None,
                "",
                f"the YAML expands to more than {MAX_NODES:,} nodes through its "
                "aliases; a study file needs a few hundred",
            )
        data = yaml.safe_load(text)
        lines = _compose_lines(text, source)
    except RecursionError:
        raise StudyError(source, None, "", f"the YAML is nested more than {MAX_DEPTH} levels deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise StudyError(source, line, "", f"malformed YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise StudyError(source, None, "", f"malformed YAML: {exc}") from None
    return data, lines


# ---------------------------------------------------------------- pydantic errors, located


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the (nested) pydantic model at ``path``, for did-you-mean; a mapping
    of models (``hypotheses: {name: Hypothesis}``) is stepped through by its keys."""
    node: Any = model
    for part in path:
        if isinstance(node, type) and issubclass(node, BaseModel):
            info = node.model_fields.get(part)
            node = getattr(info, "annotation", None)
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
        if typing.get_origin(node) is Annotated:
            node = typing.get_args(node)[0]
        if typing.get_origin(node) in (typing.Union, types.UnionType):  # Model | None, list | Model
            options = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in typing.get_args(node)]
            models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
            node = models[0] if models else next((a for a in options if a is not type(None)), None)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _describe(error: dict, model: type[BaseModel], path: tuple) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"unknown key{_suggest(path[-1], _fields_at(model, path[:-1]))}"
    if kind == "missing":
        return "required key is missing"
    if "input" in error and kind not in ("model_type", "dict_type"):
        return f"{message} (got {error['input']!r})"
    return message


def located_error(exc: ValidationError, model: type[BaseModel], locate, prefix: tuple = ()) -> StudyError:
    """The first pydantic error as a StudyError; ``locate(path)`` gives (source, line).
    Unknown keys come first: a misspelt key usually also causes the "missing" error."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tag-"))))
    source, line = locate(prefix + path)
    return StudyError(source, line, format_path(prefix + path), _describe(error, model, path))


# ---------------------------------------------------------------- overrides


def set_dotted(config: dict, key: str, value: Any) -> None:
    """config[a][b][c] = value for key "a.b.c", creating sections on the way."""
    *sections, leaf = key.split(".")
    node = config
    for part in sections:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def check_engine_key(key: str) -> str | None:
    """None if ``key`` names an engine config field, else the reason with a suggestion."""
    if key in ENGINE_KEYS:
        return None
    return f"no such engine config field{_suggest(key, ENGINE_KEYS)}"


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return config


def parse_set_options(options: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values parse as YAML scalars (``200``, ``1e-3``, ``null``)."""
    overrides: dict[str, Any] = {}
    for option in options:
        key, sep, raw = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StudyError("--set", None, option, "expected key=value, e.g. --set train.steps=500")
        reason = check_engine_key(key)
        if reason:
            raise StudyError("--set", None, key, reason)
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


# ---------------------------------------------------------------- loading


MAX_STUDY_BYTES = 1 << 20  # the shipped studies are a few KB; YAML parsing takes seconds per MB


def _read_study_bytes(path: Path, source: str) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_STUDY_BYTES: a FIFO would block
    the read until a writer came, /dev/zero would fill memory, and a file of tens of MB takes
    minutes to parse before any error could be said."""
    try:
        with open(path, "rb", buffering=0, opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                kind = (
                    "a FIFO"
                    if stat.S_ISFIFO(mode)
                    else "a device"
                    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket"
                    if stat.S_ISSOCK(mode)
                    else "not a file"
                )
                raise StudyError(source, None, "", f"is {kind}, not a regular file: a study must be a YAML file")
            raw = handle.read(MAX_STUDY_BYTES + 1)
    except OSError as error:
        raise StudyError(source, None, "", f"cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_STUDY_BYTES:
        raise StudyError(
            source,
            None,
            "",
            f"larger than {MAX_STUDY_BYTES // (1 << 20)} MB: a study file is a few KB; not read further",
        )
    return raw


def load_study(path: str | Path, set_options: list[str] | None = None) -> Study:
    """Read, parse and fully validate a study file (including every arm's engine config).

    Raises StudyError (file, line, key path, reason) at the first problem.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise StudyError(source, None, "", "no such study file")
    if path.is_dir():
        raise StudyError(source, None, "", "is a directory, expected a YAML study file")
    raw = _read_study_bytes(path, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StudyError(
            source, line, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    data, lines = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise StudyError(source, 1, "", "a study file must be a mapping with keys study, question, ablations, ...")

    def locate(key_path: tuple) -> tuple[str, int | None]:
        for end in range(len(key_path), -1, -1):
            if key_path[:end] in lines:
                return source, lines[key_path[:end]]
        return source, None

    try:
        study = Study.model_validate(data)
    except ValidationError as exc:
        raise located_error(exc, Study, locate) from None
    study.source, study.lines = source, lines

    base = study.base
    set_keys: list[str] = []
    if set_options:
        overrides = parse_set_options(set_options)
        set_keys = list(overrides)
        base = apply_overrides(base, overrides)
        study.base = base
    study.set_keys = set_keys
    try:
        ExperimentConfig.model_validate(base)
    except ValidationError as exc:
        error = located_error(exc, ExperimentConfig, locate, ("base",))
        # a value given with --set is named at the option: the study file's line has no part in it
        given = next((k for k in set_keys if _within(f"base.{k}", error.key) or _within(error.key, f"base.{k}")), None)
        if given is not None:
            raise StudyError("--set", None, given, error.message) from None
        raise error from None

    _check_ablations(study, locate)
    _check_arm_labels(study)
    if study.tune is not None:
        _check_tune(study)
    _check_hypotheses(study)
    _check_arm_keys(study, set_keys)
    return study


@dataclass(frozen=True)
class Arm:
    label: str
    levels: dict[str, str]  # axis -> level
    overrides: dict[str, Any]  # dotted key -> value, merged over all axes


def baseline_levels(study: Study) -> dict[str, str]:
    """The baseline's level per axis: as declared, else each axis's first level."""
    chosen = dict(study.baseline or {})
    for axis, levels in study.ablations.items():
        chosen.setdefault(axis, next(iter(levels)))
    return chosen


def expand_arms(study: Study) -> list[Arm]:
    """The arms of the study's design, in a stable order (baseline first where it exists)."""
    return [arm for arm, _ in arms_with_chosen_axes(study)]


def arms_with_chosen_axes(study: Study) -> list[tuple[Arm, list[str]]]:
    """Each arm with the axes it chooses itself; its other axes take the baseline's level.
    Overrides apply the baseline's levels first and the chosen ones last, so an arm's own
    level wins over a baseline default that sets the same key (one_at_a_time's annotated arm
    keeps its per-block time MLP whatever the axis order)."""
    axes = list(study.ablations)
    base = baseline_levels(study)
    if study.arms is not None:
        choices = [(name, {**base, **levels}, list(levels)) for name, levels in study.arms.items()]
    elif not axes:
        choices = [("base", {}, [])]
    elif study.design == "factorial":
        combos = itertools.product(*(list(study.ablations[a]) for a in axes))
        choices = [("-".join(combo), dict(zip(axes, combo)), list(axes)) for combo in combos]
    else:  # one_at_a_time: the baseline, then each non-baseline level alone
        all_levels = [lvl for a in axes for lvl in study.ablations[a]]
        choices = [("baseline", dict(base), list(axes))]
        for axis in axes:
            for level in study.ablations[axis]:
                if level != base[axis]:
                    label = level if all_levels.count(level) == 1 else f"{axis}.{level}"
                    choices.append((label, {**base, axis: level}, [axis]))
    out = []
    for label, levels, chosen in choices:
        overrides: dict[str, Any] = {}
        for axis in [a for a in axes if a not in chosen] + [a for a in axes if a in chosen]:
            overrides.update(study.ablations[axis][levels[axis]])
        out.append((Arm(label=label, levels=levels, overrides=overrides), chosen))
    return out


def baseline_arm(study: Study, arms: list[Arm]) -> str | None:
    base = baseline_levels(study)
    for arm in arms:
        if arm.levels == base:
            return arm.label
    return None


def _within(key: str, section: str) -> bool:
    """Whether dotted ``key`` is ``section`` or lies inside it."""
    return key == section or key.startswith(section + ".")


def _check_arm_labels(study: Study) -> None:
    """Two arms with one label would be merged into one arm (its seeds listed twice, its
    hypotheses judged on mixed runs): an error naming both definitions. Labels are compared
    case-blind, as a file system or a reader would confuse them; a one_at_a_time level named
    like the baseline arm is the same collision."""
    seen: dict[str, tuple[str, tuple]] = {}
    base = baseline_levels(study)
    for index, (arm, chosen) in enumerate(arms_with_chosen_axes(study)):
        if study.arms is not None:
            where = ("arms", arm.label)
        elif index == 0 and study.design == "one_at_a_time" and arm.levels == base:  # the baseline arm itself
            where = ("baseline",) if study.baseline else ("ablations",)
        else:
            where = ("ablations", chosen[-1], arm.levels[chosen[-1]]) if chosen else ("ablations",)
        label = arm.label.casefold()
        if label in seen:
            first_label, first_where = seen[label]

            def named(path: tuple, text: str) -> str:
                line = study.line_of(path)
                return f"{text!r} from {format_path(path)}" + (f" (line {line})" if line else "")

            raise study.error(
                where,
                f"two arms get the label {arm.label!r}: {named(first_where, first_label)} and "
                f"{named(where, arm.label)}; they would be merged into one arm. Rename a level"
                + (" (a level may not be called 'baseline' unless it is the baseline)" if label == "baseline" else ""),
            )
        seen[label] = (arm.label, where)


def _check_arm_keys(study: Study, set_keys: list[str]) -> None:
    """Overrides that would silently do nothing: two axes of one arm setting the same key (the
    later would win), a --set of the seed (the study's `seeds` decide it), or a --set of a key
    that every arm sets itself."""
    with_chosen = arms_with_chosen_axes(study)
    arms = [arm for arm, _ in with_chosen]
    for arm, chosen in with_chosen:
        setters: dict[str, str] = {}
        for axis in chosen:
            level = arm.levels[axis]
            for key in study.ablations[axis][level]:
                if key in setters:
                    raise study.error(
                        ("ablations", axis, level, key),
                        f"arm {arm.label!r} takes {key} from both {setters[key]} and {axis}.{level}: one would "
                        "silently win; set it in one axis only",
                    )
                setters[key] = f"{axis}.{level}"
    for key in set_keys:
        if key == "train.seed":
            raise StudyError(
                "--set",
                None,
                key,
                "the seed of every run comes from the study's `seeds` list; "
                "change that list (or use a copy of the study) instead",
            )
        if arms and study.ablations and all(key in arm.overrides for arm in arms):
            raise StudyError(
                "--set",
                None,
                key,
                "every arm of this study sets this key itself, so --set would "
                "change nothing; edit the study's levels instead",
            )


def _check_hypotheses(study: Study) -> None:
    """Metric and arm names of the hypotheses block, against the registry and the design."""
    if not study.hypotheses:
        return
    arms = expand_arms(study)
    labels = [a.label for a in arms]
    baseline = baseline_arm(study, arms)
    for name, hypothesis in study.hypotheses.items():
        if hypothesis.metric not in metrics.PER_RUN:
            raise study.error(
                ("hypotheses", name, "metric"),
                f"{hypothesis.metric!r} is not a declared per-run metric{_suggest(hypothesis.metric, metrics.PER_RUN)}",
            )
        problem = scale_problem(hypothesis)
        if problem:
            raise study.error(("hypotheses", name, "expect" if hypothesis.expect == "within" else "value"), problem)
        if hypothesis.arm is not None and hypothesis.arm not in labels:
            raise study.error(
                ("hypotheses", name, "arm"),
                f"no arm {hypothesis.arm!r} in this study{_suggest(hypothesis.arm, labels)}; its arms are {', '.join(labels)}",
            )
        if hypothesis.versus == "baseline":
            if baseline is None:
                raise study.error(("hypotheses", name, "versus"), "versus: baseline, but the study has no baseline arm")
            if hypothesis.arm == baseline:
                raise study.error(
                    ("hypotheses", name, "arm"), f"{baseline!r} is the baseline arm: it cannot be compared with itself"
                )
            _check_comparable(study, name, hypothesis, arms, baseline)


def _check_comparable(study: Study, name: str, hypothesis: Hypothesis, arms: list[Arm], baseline: str) -> None:
    """A metric measured in each run's own objective or noise levels (Metric.measured_in) is
    compared with the baseline only by arms that agree with it on them: an eps MSE over other
    noise levels, or a loss under another weighting, is another quantity, not an effect."""
    parts = metrics.PER_RUN[hypothesis.metric].measured_in
    if not parts:
        return

    def basis(arm: Arm) -> dict[str, str] | None:
        try:
            config = ExperimentConfig.model_validate(apply_overrides(study.base, arm.overrides))
        except ValidationError:  # reported against the arm when the runs are expanded
            return None
        return metrics.measurement_basis(config.to_dict())

    by_label = {a.label: a for a in arms}
    reference = basis(by_label[baseline])
    for arm in [by_label[hypothesis.arm]] if hypothesis.arm else [a for a in arms if a.label != baseline]:
        mine = basis(arm)
        differ = [p for p in parts if None not in (mine, reference) and mine[p] != reference[p]]
        if differ:
            raise study.error(
                ("hypotheses", name, "metric"),
                f"{hypothesis.metric} is measured in each run's own {' and '.join(metrics.MEASURED_IN[p] for p in differ)}, "
                f"and arm {arm.label!r} differs from the baseline {baseline!r} in them: the comparison would be of "
                "two different quantities (bits/dim is comparable across them)",
            )


def _check_tune(study: Study) -> None:
    tune = study.tune
    tunable = metrics.tunable()
    if tune.metric not in tunable:
        raise study.error(
            ("tune", "metric"),
            f"not a tunable metric{_suggest(tune.metric, tunable)}; one of {', '.join(sorted(tunable))}",
        )
    for key, distribution in tune.space.items():
        where = ("tune", "space", key)
        reason = check_engine_key(key)
        if reason:
            raise study.error(where, reason)
        for value in distribution.extremes():
            try:
                ExperimentConfig.model_validate(apply_overrides(study.base, {key: value}))
            except ValidationError as exc:
                raise study.error(where, f"{value!r}: {_describe(exc.errors()[0], ExperimentConfig, ())}") from None


def _check_ablations(study: Study, locate) -> None:
    if not study.seed_list:
        raise study.error(("seeds",), "empty expansion: list at least one seed")
    if len(set(study.seed_list)) != len(study.seed_list):
        raise study.error(("seeds",), "duplicate seeds")
    for axis, levels in study.ablations.items():
        if not levels:
            raise study.error(("ablations", axis), "empty expansion: an axis needs at least one level")
        for level, overrides in levels.items():
            for key in overrides:
                where = ("ablations", axis, level, key)
                reason = check_engine_key(key)
                if reason:
                    raise study.error(where, reason)
            config = apply_overrides(study.base, overrides)
            try:
                ExperimentConfig.model_validate(config)
            except ValidationError as exc:
                error = exc.errors()[0]
                loc = ".".join(str(p) for p in error["loc"])
                key = next((k for k in overrides if loc.startswith(k) or k.startswith(loc)), None)
                where = ("ablations", axis, level) + ((key,) if key else ())
                message = _describe(error, ExperimentConfig, tuple(error["loc"]))
                if key is None:
                    message = f"{loc}: {message}"
                raise study.error(where, message) from None

    if study.baseline is not None:
        for axis, level in study.baseline.items():
            if axis not in study.ablations:
                raise study.error(("baseline", axis), f"no such ablation axis{_suggest(axis, study.ablations)}")
            if level not in study.ablations[axis]:
                raise study.error(
                    ("baseline", axis), f"no level {level!r} in axis {axis!r}{_suggest(level, study.ablations[axis])}"
                )
    if study.arms is not None:
        if not study.arms:
            raise study.error(("arms",), "empty expansion: `arms` lists no arm")
        for arm, choice in study.arms.items():
            for axis, level in choice.items():
                if axis not in study.ablations:
                    raise study.error(("arms", arm, axis), f"no such ablation axis{_suggest(axis, study.ablations)}")
                if level not in study.ablations[axis]:
                    raise study.error(
                        ("arms", arm, axis),
                        f"no level {level!r} in axis {axis!r}{_suggest(level, study.ablations[axis])}",
                    )
