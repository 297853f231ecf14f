"""Where a run's trained weights live, and how a training is shared instead of repeated.

A checkpoint belongs to a *training*, not to a run: it lives under
``results/<study>/checkpoints/<train_key>/`` (plan.train_key: the config without `sample` and
`eval`, and the seed). Runs that differ only in how they are measured (another sampler, other
probe settings, a newer MEASURE_VERSION) therefore find the finished weights and are measured
from them: the engine restores the final step, probes again when its final probe was taken
under other settings (ddpm_engine.experiment.train_with_probes), and samples; nothing is
trained. Checkpoints written before this layout sit under the run key; they are moved to the
train key on first use. A training finished in another study under the same results root is
copied here before its run starts, so the run is measured, not trained again
(docs/design.md, "Re-measure, don't retrain").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ddpm_engine.files import atomic_write

from ..study.plan import RunSpec, train_key

CHECKPOINT = "last.pt"


def _folders(results: Path, spec: RunSpec) -> tuple[Path, Path]:
    """(the folder of ``spec``'s training under its train key, the run-key folder where code
    before 2026-12-07 kept it)."""
    folder = Path(results) / spec.study / "checkpoints"
    return folder / spec.train_key, folder / spec.key


def checkpoint_dir(results: Path, spec: RunSpec) -> Path:
    """The folder of ``spec``'s training in its own study. A checkpoint older code left under
    the run key is moved here (a rename: the same file system)."""
    mine, legacy = _folders(results, spec)
    if not mine.exists() and (legacy / CHECKPOINT).exists():
        try:
            os.replace(legacy, mine)
        except OSError:  # another process moved it first, or it cannot be moved: use it where it is
            return mine if mine.exists() else legacy
    return mine


def untrained(spec: RunSpec) -> bool:
    """A reference arm (model.preset names a parameter-free denoiser): it has no training to
    keep, so measuring it again is all it ever costs."""
    from ddpm_engine.metrics import REFERENCE_NAMES

    return spec.config.model.preset in REFERENCE_NAMES


def has_checkpoint(results: Path, spec: RunSpec) -> bool:
    """Whether ``spec``'s training has a checkpoint in its study (under the train key, or the
    run key where older code left it); moves nothing, so `harness plan` may ask."""
    return any((folder / CHECKPOINT).exists() for folder in _folders(results, spec))


def finished_trainings(results: Path, study: str) -> dict[str, Path]:
    """train key -> its checkpoint file, for the finished runs of ``study`` whose checkpoint is
    on disk (under the train key, or under the run key where older code left it)."""
    from .ledger import Ledger

    folder = Path(results) / study / "checkpoints"
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for key, row in Ledger.load(results, study).rows.items():
        if not Ledger.row_is_finished(row):
            continue
        try:
            trained = train_key(json.loads(row.get("config_json") or ""), int(row["seed"]))
        except (ValueError, TypeError, KeyError):  # a row without a config this code can read
            continue
        for candidate in (folder / trained / CHECKPOINT, folder / key / CHECKPOINT):
            if candidate.exists():
                found.setdefault(trained, candidate)
    return found


def trained_elsewhere(results: Path, study: str, specs: list[RunSpec]) -> dict[str, tuple[str, Path]]:
    """run key -> (source study, checkpoint file) for the specs whose training finished in
    another study under ``results`` and has no checkpoint in ``study`` yet; the first study in
    name order wins."""
    root = Path(results)
    wanted = {s.train_key: s for s in specs if not has_checkpoint(results, s)}
    found: dict[str, tuple[str, Path]] = {}
    if not wanted or not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != study and not p.name.startswith(".")):
        for trained, path in finished_trainings(root, folder.name).items():
            for spec in specs:
                if spec.train_key == trained and spec.key not in found and spec.train_key in wanted:
                    found[spec.key] = (folder.name, path)
    return found


def copy_checkpoint(results: Path, spec: RunSpec, source: Path) -> Path:
    """Copy a finished training's checkpoint into ``spec``'s checkpoint folder, atomically
    (a kill midway leaves no checkpoint, and the copy is made again next time)."""
    target = checkpoint_dir(results, spec) / CHECKPOINT
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
