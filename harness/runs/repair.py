"""Damaged tables of finished runs: restored from MLflow, else measured (or trained) again.

A finished run leaves one file per table and its sample grid in results/<study>
(tables.ARTIFACT_FOLDERS), and its MLflow run holds a copy of each as an artifact. A file lost
or cut short outside the atomic writes (a full disk, a copy killed midway, a hand edit) used to
be set aside as ``.corrupt`` and forgotten: the key stayed finished, and every verdict after it
counted one seed fewer. Here each such file is put back from the key's MLflow run; when MLflow
has no readable copy either, the key's `runs` row and MLflow run are marked interrupted, so the
ledger runs it again, and the engine measures it from its final checkpoint (or trains it, if no
checkpoint exists). Each key gets one line saying which (docs/design.md, "Nothing lost,
nothing run twice").
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from ..store.states import RunState
from ..study.plan import RunSpec
from .ledger import Ledger

SUFFIX = {"samples": ".png", "configs": ".yaml"}  # every other folder holds a table, .parquet


def open_tracking_client():
    """The MLflow client, for a repair that needs one: imported only when a table is damaged,
    so that MLflow loads while the slots start."""
    from ..store.tracking import make_client

    return make_client()


def file_of(results: Path, study: str, folder: str, key: str) -> Path:
    return Path(results) / study / folder / f"{key}{SUFFIX.get(folder, '.parquet')}"


def sound(path: Path) -> bool:
    """Whether ``path`` exists and, for a table, its footer reads; an unreadable table is set
    aside as ``<name>.corrupt`` as ``tables.read_table`` does, so both name it the same way."""
    if not path.exists():
        return False
    if path.suffix != ".parquet":
        return True
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)  # a cut-short file has no footer; reading it is the cheap test
        return True
    except (pa.ArrowInvalid, OSError):
        os.replace(path, path.with_name(path.name + ".corrupt"))
        return False


def damaged_tables(results: Path, study: str, keys: Iterable[str]) -> dict[str, list[str]]:
    """run key -> the folders of ARTIFACT_FOLDERS whose file of that key is missing or unreadable."""
    from ..store.tables import ARTIFACT_FOLDERS  # here: a study with nothing finished never loads pyarrow

    out = {}
    for key in keys:
        bad = [name for name in ARTIFACT_FOLDERS if not sound(file_of(results, study, name, key))]
        if bad:
            out[key] = bad
    return out


def finished_run(client, study: str, key: str):
    """The key's MLflow run in the study's experiment, a FINISHED one first, or None."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_key = '{key}'")
    runs.sort(key=lambda r: (r.info.status != "FINISHED", -r.info.start_time))
    return runs[0] if runs else None


def restore_tables(client, run, results: Path, study: str, key: str, folders: list[str]) -> list[str]:
    """Download each of ``folders`` from ``run``'s artifacts into results/<study>, atomically
    and only if the copy itself reads; returns the folders restored."""
    if run is None:
        return []
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per table drowns the messages
    present = {a.path for a in client.list_artifacts(run.info.run_id)}
    restored = []
    for name in folders:
        if name not in present:
            continue
        target = file_of(results, study, name, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # downloaded beside the target: the rename into place stays on one file system
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".restore-") as tmp:
            client.download_artifacts(run.info.run_id, name, tmp)
            copy = Path(tmp) / name / target.name
            if sound(copy):
                os.replace(copy, target)
                restored.append(name)
    return restored


def store_exists() -> bool:
    """False for a SQLite store whose file is absent: opening it would create an empty one."""
    from ..store.mlflow_store import sqlite_path, tracking_uri

    path = sqlite_path(tracking_uri())
    return path is None or path.exists()


def client_for_repair(open_client: Callable[[], object], log: Callable[[str], None]):
    """An MLflow client to restore tables from, or None: no store yet (never create an empty
    one just to look), or one that cannot be opened (then there is no copy to restore from,
    which is said, and the caller re-measures or trains instead)."""
    try:
        return open_client() if store_exists() else None
    except Exception as error:  # noqa: BLE001 - an unusable store only means no copy from it
        log(f"[yellow]cannot read MLflow to restore damaged tables: {type(error).__name__}: {str(error)[:200]}[/]")
        return None


def measurable(results: Path, spec: RunSpec) -> bool:
    """Whether the key can be measured without training: its training is on disk here or in
    another study (copied in before its run starts), or it has none to keep."""
    from .checkpoints import has_checkpoint, trained_elsewhere, untrained

    return untrained(spec) or has_checkpoint(results, spec) or bool(trained_elsewhere(results, spec.study, [spec]))


def repair_study(
    results: Path,
    study: str,
    specs: list[RunSpec],
    open_client: Callable[[], object],
    log: Callable[[str], None] = print,
    measure: bool = True,
) -> set[str]:
    """Restore the damaged tables of ``study``'s finished keys from MLflow; with ``measure``
    (`harness run`), mark the keys MLflow cannot restore as interrupted so they run again and
    return them; without (`harness report`, which trains nothing), only name them."""
    ledger = Ledger.load(results, study)
    finished = [s for s in specs if ledger.is_current(s.key)]
    damaged = damaged_tables(results, study, [s.key for s in finished]) if finished else {}
    if not damaged:
        return set()
    client = client_for_repair(open_client, log)
    again: set[str] = set()
    for spec in finished:
        folders = damaged.get(spec.key)
        if not folders:
            continue
        run = finished_run(client, study, spec.key) if client is not None else None
        restored = restore_tables(client, run, results, study, spec.key, folders) if run is not None else []
        if restored:
            log(f"restored {', '.join(restored)} of {spec.name} from its MLflow run")
        lost = [name for name in folders if name not in restored]
        if not lost:
            continue
        what = f"{', '.join(lost)} of {spec.name} {'is' if len(lost) == 1 else 'are'} {_how(results, study, spec.key, lost)}"
        what += f" and {_no_copy(run)}"
        if not measure:
            log(
                f"[yellow]{what}: the report shows the run without "
                f"{'it' if len(lost) == 1 else 'them'} (`harness run` measures it again)[/]"
            )
            continue
        then = "measured again from its checkpoint" if measurable(results, spec) else "trained again (no checkpoint)"
        log(f"[yellow]{what}: {then}[/]")
        import pandas as pd

        from ..store.tables import write_table

        reason = f"{', '.join(lost)} damaged and not in MLflow: {then}"
        row = {k: v for k, v in ledger.row(spec.key).items() if k != "run_key"}
        if run is not None:  # both stores say "not finished", so neither restores the other first
            client.set_terminated(run.info.run_id, status="KILLED")
        write_table(
            results,
            study,
            "runs",
            spec.key,
            pd.DataFrame([row | {"status": str(RunState.INTERRUPTED), "error": reason}]),
        )
        again.add(spec.key)
    return again


def _no_copy(run) -> str:
    """Why MLflow gives no copy back: its run's artifacts folder is gone (a project folder
    moved without them: harness.store.mlflow_store.relocate_artifacts points the store at them where they
    are), or the run lacks the table."""
    from ..store.mlflow_store import local_folder

    folder = local_folder(run.info.artifact_uri or "") if run is not None else None
    if folder is not None and not folder.exists():
        return f"MLflow's copy is not in {folder}, where its store keeps it (moved or deleted)"
    return "MLflow has no copy"


def _how(results: Path, study: str, key: str, folders: list[str]) -> str:
    corrupt = any(file_of(results, study, n, key).with_name(f"{key}.parquet.corrupt").exists() for n in folders)
    return "damaged" if corrupt else "missing"
