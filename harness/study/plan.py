"""Expand a study into runs: arms x seeds, each a resolved engine config with a run key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ddpm_engine.config import ExperimentConfig
from ddpm_engine.files import atomic_write

from .spec import Arm, Study, _describe, apply_overrides, baseline_arm, baseline_levels, expand_arms


@dataclass(frozen=True)
class RunSpec:
    study: str
    arm: Arm
    seed: int
    config: ExperimentConfig = field(repr=False)
    key: str

    @property
    def name(self) -> str:
        return f"{self.arm.label}-s{self.seed}"

    @property
    def config_json(self) -> str:
        return canonical_json(self.config.to_dict())

    @property
    def train_key(self) -> str:
        """The key of what this run trains (``train_key``): runs that share it share one
        training and one checkpoint, and are measured each their own way."""
        return train_key(self.config, self.seed)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def run_key(config: ExperimentConfig, seed: int) -> str:
    """First 12 hex of sha256 over the canonical JSON of (resolved config as keys see it:
    ExperimentConfig.key_dict, seed)."""
    payload = canonical_json({"config": config.key_dict(), "seed": seed})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_key(config: ExperimentConfig | dict, seed: int) -> str:
    """First 12 hex of sha256 over the canonical JSON of (the config without its measurement
    sections, seed): what determines the trained weights (ExperimentConfig.training_dict).
    Two arms that differ only in `sample.*` or `eval.*` have different run keys and one train
    key (docs/design.md, "Re-measure, don't retrain")."""
    if isinstance(config, dict):
        config = ExperimentConfig.model_validate(config)
    payload = canonical_json({"config": config.training_dict(), "seed": seed, "trained": True})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def expand(study: Study) -> list[RunSpec]:
    """Every (arm, seed) of the study as a RunSpec; a combination of levels that is invalid
    together (though each is valid alone) is reported against the arm."""
    runs = []
    for arm in expand_arms(study):
        raw = apply_overrides(study.base, arm.overrides)
        for seed in study.seed_list:
            raw_seeded = apply_overrides(raw, {"train.seed": seed})
            try:
                config = ExperimentConfig.model_validate(raw_seeded)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ("arms", arm.label) if study.arms else ("ablations",)
                raise study.error(
                    where,
                    f"arm {arm.label!r} ({', '.join(f'{a}={lv}' for a, lv in arm.levels.items())}): "
                    f"{'.'.join(map(str, error['loc']))}: {_describe(error, ExperimentConfig, tuple(error['loc']))}",
                ) from None
            runs.append(RunSpec(study=study.study, arm=arm, seed=seed, config=config, key=run_key(config, seed)))
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        dupes = sorted({r.name for r in runs if keys.count(r.key) > 1})
        raise study.error(("ablations",), f"arms resolve to identical configs: {', '.join(dupes)}")
    return runs


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(study: Study, spec: RunSpec) -> dict[str, Any]:
    """Resolved config values where this run differs from the study's base (seed aside):
    what an arm really changes, including what a preset change drags along."""
    base = flat_config(ExperimentConfig.model_validate(study.base).to_dict())
    mine = flat_config(spec.config.to_dict())
    return {k: v for k, v in mine.items() if base.get(k) != v and k != "train.seed"}


def study_manifest(study: Study, runs: list[RunSpec]) -> dict:
    """What a report needs to know about the design (written as results/<study>/study.json)."""
    arms = expand_arms(study)
    return {
        "study": study.study,
        "question": study.question,
        "design": "arms" if study.arms is not None else study.design,
        "axes": {axis: list(levels) for axis, levels in study.ablations.items()},
        "baseline": baseline_levels(study) if study.ablations else None,
        "baseline_arm": baseline_arm(study, arms),
        "seeds": study.seed_list,
        "adaptive": study.adaptive.model_dump() if study.adaptive else None,
        "arms": [{"arm": a.label, "levels": a.levels, "overrides": a.overrides} for a in arms],
        "runs": [{"run_key": r.key, "arm": r.arm.label, "seed": r.seed} for r in runs],
        "hypotheses": {name: h.model_dump(mode="json") for name, h in study.hypotheses.items()},
    }


def write_manifest(results: Path, manifest: dict) -> Path:
    """results/<study>/study.json (what a report needs of the design), atomically and only
    when it changed."""
    path = Path(results) / manifest["study"] / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2)
    if not path.exists() or path.read_text() != text:
        # a temp file of its own (not a fixed study.json.tmp): two `harness run` of one study
        # write this at once, and a shared name was renamed away under the other
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
