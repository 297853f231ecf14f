"""Results reused across studies: a run key finished in another study is copied, not retrained.

A run key hashes (resolved config, seed), so studies that train the same config share it: the
tiny L_simple + EMA config is timestep_ablation's T1000, objective_ablation's baseline,
time_embedding_ablation's shared arm and darkening_diagnosis's ema arm. Before training,
`harness run` looks for each pending key in the other studies under the same results root;
a key finished there is *adopted*: its tables and sample grid are copied into this study
(the source study is never modified), this study's `runs` row records it as finished with
its own arm and levels and ``reused_from`` naming the source, and its MLflow run in this
study's experiment is rebuilt from those tables, tagged ``reused_from``
(docs/design.md, "Reuse across studies").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable

from ddpm_engine.files import atomic_write

from ..store.states import RunState
from .ledger import Ledger


def finished_elsewhere(results: Path, study: str, keys: Iterable[str]) -> dict[str, str]:
    """run key -> the study (under ``results``) in which it finished, for the given keys; the
    first study in name order wins, and ``study`` itself is never a source."""
    root = Path(results)
    wanted = set(keys)
    found: dict[str, str] = {}
    if not wanted or not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != study and not p.name.startswith(".")):
        candidates = [k for k in wanted - set(found) if (folder / "runs" / f"{k}.parquet").exists()]
        if candidates:
            ledger = Ledger.load(root, folder.name)
            # an outdated source (older MEASURE_VERSION) is not copied: its training is, by
            # harness.runs.checkpoints, and the run measured again
            found.update({k: folder.name for k in candidates if ledger.is_current(k)})
    return found


def sound_sources(
    results: Path, sources: dict[str, str], specs: list, open_client: Callable[[], object], log: Callable[[str], None]
) -> dict[str, str]:
    """``sources`` (run key -> source study) without the keys whose source has a damaged table
    that its MLflow run cannot restore: adopting them would copy the damage (and fail to
    read it), so they are measured from the source's checkpoint (harness.runs.checkpoints) or
    trained here instead. Restoring a source puts back the file it had, nothing else."""
    from .repair import client_for_repair, damaged_tables, finished_run, measurable, restore_tables

    damaged = {k: v for k, v in sources.items() if damaged_tables(results, v, [k])}
    if not damaged:
        return sources
    client = client_for_repair(open_client, log)
    kept = dict(sources)
    for spec in specs:
        source = damaged.get(spec.key)
        if source is None:
            continue
        folders = damaged_tables(results, source, [spec.key]).get(spec.key, [])
        run = finished_run(client, source, spec.key) if client is not None else None
        restored = restore_tables(client, run, results, source, spec.key, folders) if run is not None else []
        if restored:
            log(f"restored {', '.join(restored)} of {spec.name} in study {source} from its MLflow run")
        lost = [name for name in folders if name not in restored]
        if lost:
            del kept[spec.key]
            then = (
                f"measured from the training {source} finished"
                if measurable(results, spec)
                else "trained here (no checkpoint to measure from)"
            )
            log(
                f"[yellow]{', '.join(lost)} of {spec.name} in study {source} "
                f"{'is' if len(lost) == 1 else 'are'} damaged and its MLflow run has no copy: not reused; {then}[/]"
            )
    return kept


def copy_run_files(results: Path, source: str, study: str, key: str) -> list[Path]:
    """Copy a finished key's files (tables, sample grid, config) from ``source`` into ``study``,
    each atomically; returns the copies (the artifacts its MLflow run logs)."""
    # here: `harness plan` calls finished_elsewhere and must not load pyarrow
    from ..store.tables import ARTIFACT_FOLDERS
    from .repair import SUFFIX

    root = Path(results)
    copies = []
    for folder in [*ARTIFACT_FOLDERS, "configs"]:
        suffix = SUFFIX.get(folder, ".parquet")
        origin = root / source / folder / f"{key}{suffix}"
        if not origin.exists():
            continue
        target = root / study / folder / f"{key}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        copies.append(atomic_write(target, lambda tmp, origin=origin: shutil.copyfile(origin, tmp)))
    return copies


def adopt(client, experiment_id: str, spec, results: Path, source: str, commit: str = "") -> str:
    """Make ``spec``'s key, finished in study ``source``, a finished run of this study: its
    files copied, its MLflow run rebuilt from them in this study's experiment and tagged
    ``reused_from``, and its `runs` row (this study's arm and levels) written last, so a kill
    midway leaves the key pending and the next run adopts it again. Returns the MLflow run id."""
    from ..store.tracking import RunTracker
    from .reconcile import rebuild_in_mlflow

    copy_run_files(results, source, spec.study, spec.key)
    origin = Ledger.load(results, source).row(spec.key)
    note = f"reused from study {source} (same run key: same config and seed); not trained again"
    version = Ledger(results, source, {spec.key: origin}).measure_version(spec.key)
    # on the MLflow run before it is FINISHED: a kill before the `runs` row below leaves a key
    # that the next `harness run` restores from that run, which must still say where it came from
    tags = {"reused_from": source, "note": note, "measure_version": version}
    run_id, _ = rebuild_in_mlflow(client, experiment_id, spec, results, commit=commit, tags=tags)
    tracker = RunTracker(client, experiment_id, spec, results, commit or "unknown")
    tracker.run_id = run_id
    tracker.write_runs_row(
        RunState.FINISHED,
        params=origin.get("params"),
        seconds=origin.get("seconds"),
        note=note,
        measure_version=version,
    )
    return run_id
