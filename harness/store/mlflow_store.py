"""The MLflow store as `harness run` finds it, looked at before any training starts, and
the parent's calls to it while the slots train.

These questions are answered here without importing MLflow (3 s, which the slots' start must
not wait for), by reading the default store, a SQLite file, directly:

* Is the store whole? MLflow builds its schema through alembic migrations, one statement at
  a time; a process killed midway (an older harness, `mlflow ui`, a kill during an MLflow
  upgrade) leaves tables such as ``_alembic_tmp_latest_metrics`` or a schema revision behind
  the installed MLflow's, and MLflow then refuses the file ("table ... already exists",
  "duplicate column name"). ``check_store`` finds that, repairs a copy (leftover tables
  dropped, then MLflow's own migration) or, failing that, moves the file aside as
  ``mlflow.db.broken-<time>`` for a new store; `harness run` then rebuilds the study's
  finished runs in it from results/ (harness.runs.reconcile).
* Which run keys has MLflow finished? A key finished there is never trained again, even
  when results/ lost its record of it (``finished_keys``), unless MLflow cannot give its
  tables back: its artifacts folder is gone (``unreachable_artifacts``).
* Was the project folder moved? The store records absolute artifact folders; those of a
  moved folder are pointed at where they are now (``relocate_artifacts``).
* Can it be written? (``probe_store``: a server that answers, a writable file, no lock held
  for long.)

Any other tracking URI (a server) is asked through MLflow's client. While the slots train,
the parent's MLflow calls go through ``GuardedClient``: a lock or a server that does not
answer is waited out for a bounded time, then the failure is one line (``StoreFailure``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import sqlite3
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

# Tables every MLflow tracking store has had since MLflow 1.0: a store without one is half made.
CORE_TABLES = ("experiments", "runs", "tags", "params", "metrics", "latest_metrics", "experiment_tags")
LEFTOVER_PREFIX = "_alembic_tmp_"  # alembic's batch migrations copy a SQLite table through one of these
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")  # a rollback journal left beside the old file would corrupt a new one


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the working directory.

    Set explicitly because MLflow falls back to a ./mlruns file store when one exists,
    which recent MLflow refuses; `mlflow ui` started here shows the same runs.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str) -> None:
    """Create a new SQLite store in one piece: the schema is built in a temp file that then
    replaces ``mlflow.db`` in one rename, under a file lock, so two processes starting at once
    do not race through MLflow's migrations (which left "duplicate column name" errors) and a
    kill during creation leaves no half-made store behind (which alembic then refused)."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be creating it: wait for it
        if not path.exists():
            _create(path)


def _create(path: Path) -> None:
    """A new store at ``path``, built beside it and renamed into place."""
    from mlflow import MlflowClient

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def mlflow_revisions() -> tuple[str, frozenset[str]]:
    """(head, every revision) of the installed MLflow's schema migrations, read from its
    migration scripts as text: alembic's ScriptDirectory imports each of them (seconds)."""
    package = importlib.util.find_spec("mlflow")
    folder = Path(package.submodule_search_locations[0]) / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in folder.glob("*.py"):
        text = script.read_text()
        revisions.update(re.findall(r'^revision\s*=\s*"(\w+)"', text, re.M))
        parents.update(re.findall(r'^down_revision\s*=\s*"(\w+)"', text, re.M))
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"cannot tell MLflow's schema head from {folder}: heads {sorted(heads)}")
    return heads.pop(), frozenset(revisions)


@dataclass
class StoreCheck:
    """What ``check_store`` found and did; ``message`` is empty for a whole store."""

    problems: list[str] = field(default_factory=list)
    message: str = ""
    newer: bool = False  # written by a newer MLflow: not ours to repair


def inspect_sqlite(path: Path) -> StoreCheck:
    """The problems of the SQLite store at ``path`` (none when MLflow will open it as it is)."""
    head, known = mlflow_revisions()
    try:
        with closing(sqlite3.connect(path)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = (
                [v for (v,) in db.execute("SELECT version_num FROM alembic_version")]
                if "alembic_version" in tables
                else None
            )
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):  # another process is writing it: not damage
            return StoreCheck()
        return StoreCheck([f"not a readable SQLite database ({error})"])
    except sqlite3.DatabaseError as error:  # "file is not a database", "disk image is malformed"
        return StoreCheck([f"not a readable SQLite database ({error})"])
    if not tables:
        return StoreCheck(["no tables (its creation stopped before the first)"])
    problems = []
    leftovers = sorted(t for t in tables if t.startswith(LEFTOVER_PREFIX))
    if leftovers:
        problems.append(f"leftover migration table(s) {', '.join(leftovers)}")
    missing = [t for t in CORE_TABLES if t not in tables]
    if missing:
        problems.append(f"missing table(s) {', '.join(missing)}")
    if versions is None:
        problems.append("no schema revision (table alembic_version missing)")
    elif len(versions) != 1:
        problems.append(f"{len(versions)} schema revisions recorded, expected 1")
    elif versions[0] not in known:
        return StoreCheck([f"schema revision {versions[0]} unknown to this MLflow"], newer=True)
    elif versions[0] != head:
        problems.append(f"schema at revision {versions[0]}, this MLflow expects {head}")
    return StoreCheck(problems)


def check_store(uri: str) -> StoreCheck:
    """Make the SQLite store at ``uri`` usable before anything trains: nothing to do for a
    whole one (the usual case: one small query), a missing one is left to
    ``tracking.prepare_store``; a half-made one is repaired or moved aside and replaced.
    Raises ValueError for a store a newer MLflow wrote (upgrading mlflow is the fix)."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return StoreCheck()
    found = inspect_sqlite(path)
    if not found.problems:
        return found
    if found.newer:
        raise ValueError(
            f"the MLflow store {path} has {found.problems[0]} (a newer MLflow wrote it): "
            "upgrade mlflow in this environment, or set MLFLOW_TRACKING_URI to another store"
        )
    with ExitStack() as locks:
        # ours (tracking.prepare_store creates under it) and MLflow's own, held while MLflow
        # creates or migrates a store: what looked half made may be one being made right now
        for lock_path in (path.with_name(path.name + ".lock"), _mlflow_init_lock(uri)):
            handle = locks.enter_context(open(lock_path, "a+"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        found = inspect_sqlite(path)
        if not found.problems:
            return found
        found.message = _repair_or_replace(path, found.problems)
    return found


def _mlflow_init_lock(uri: str) -> Path:
    # mlflow.store.db.utils._safe_initialize_tables locks this file, named by the md5 of the
    # engine URL (the URI as given, for SQLite), while it creates a store's tables
    return Path(tempfile.gettempdir()) / f"db_init_lock-{hashlib.md5(uri.encode(), usedforsecurity=False).hexdigest()}"


def _repair_or_replace(path: Path, problems: list[str]) -> str:
    """Repair a copy of the store and put it in place (the original kept beside it); if the
    copy cannot be repaired, move the store aside and create a new one. The message says
    what was found and done."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    found = "; ".join(problems)
    copy = path.with_name(f".{path.name}.{os.getpid()}.repair")
    try:
        dropped = _repaired_copy(path, copy)
    except OSError:  # the disk, not the store (full, read-only): nothing is moved
        copy.unlink(missing_ok=True)
        raise
    except Exception as error:  # noqa: BLE001 - whatever the migration raised: the store is replaced
        copy.unlink(missing_ok=True)
        aside = _move_aside(path, f"broken-{stamp}")
        _create(path)  # the lock prepare_store would take is held here
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return (
            f"the MLflow store {path} was half made ({found}) and could not be repaired "
            f"({type(error).__name__}: {first_line}): moved aside as {aside.name}{_holding(aside)} and a new "
            "store created; each study's finished runs are rebuilt in it from results/ when it is next run"
        )
    kept = _move_aside(path, f"before-repair-{stamp}")
    os.replace(copy, path)
    done = f"dropped {', '.join(dropped)}; " if dropped else ""
    return (
        f"the MLflow store {path} was half made ({found}): repaired ({done}schema migrated by MLflow); "
        f"the original is kept as {kept.name}"
    )


def _repaired_copy(path: Path, copy: Path) -> list[str]:
    """Copy the store (through SQLite, so that a hot journal is rolled back, not lost), drop
    the copy's leftover migration tables and let MLflow create the tables it lacks and migrate
    it to the installed schema, as it does for a store it creates. Returns the dropped tables;
    raises if the copy is still not whole."""
    copy.unlink(missing_ok=True)
    with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
        tables = {name for (name,) in target.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        dropped = sorted(t for t in tables if t.startswith(LEFTOVER_PREFIX))
        for table in dropped:
            original = table[len(LEFTOVER_PREFIX) :]
            if original not in tables:  # the migration had dropped the original: this is its only copy
                raise RuntimeError(f"{table} holds the only copy of table {original}")
            target.execute(f'DROP TABLE "{table}"')
        target.commit()
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

    uri = f"sqlite:///{copy}"
    # MLflow's own creation (initial tables where missing, then every migration from the
    # recorded revision): it runs it by itself only for a store that lacks tables
    engine = create_sqlalchemy_engine_with_retry(uri)
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # opens it as a tracking store
    left = inspect_sqlite(copy).problems
    if left:
        raise RuntimeError(f"still {'; '.join(left)} after migrating")
    return dropped


def _move_aside(path: Path, suffix: str) -> Path:
    """Rename the store and its SQLite side files to ``<name>.<suffix>``."""
    aside = path.with_name(f"{path.name}.{suffix}")
    for side in SQLITE_SIDE_FILES:
        companion = path.with_name(path.name + side)
        if companion.exists():
            os.replace(companion, aside.with_name(aside.name + side))
    os.replace(path, aside)
    return aside


def _holding(path: Path) -> str:
    """ " (it holds N runs)" when the set-aside file can still say so."""
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            (runs,) = db.execute("SELECT count(*) FROM runs").fetchone()
        return f" (it holds {runs} run(s))"
    except sqlite3.Error:
        return ""


def finished_keys(uri: str, study: str) -> set[str]:
    """Run keys of ``study`` whose MLflow run (not deleted) is FINISHED. For the SQLite store
    a query of the file; for a server, MLflow's client."""
    path = sqlite_path(uri)
    if path is not None:
        if not path.exists():
            return set()
        try:
            with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
                rows = db.execute(
                    "SELECT tags.value FROM runs JOIN experiments ON experiments.experiment_id = runs.experiment_id "
                    "JOIN tags ON tags.run_uuid = runs.run_uuid AND tags.key = 'run_key' "
                    "WHERE experiments.name = ? AND runs.status = 'FINISHED' AND runs.lifecycle_stage = 'active'",
                    (study,),
                ).fetchall()
            return {key for (key,) in rows}
        except sqlite3.Error:  # a schema these tables no longer describe: ask MLflow
            pass
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return set()
    keys, token = set(), None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1000, page_token=token
        )
        keys.update(run.data.tags["run_key"] for run in page if "run_key" in run.data.tags)
        token = page.token
        if not token:
            return keys


ARTIFACTS_FOLDER = "mlartifacts"  # beside the default store: tracking.artifact_location


def local_folder(location: str) -> Path | None:
    """The folder of a local artifact location (a file:// URI or a plain path), else None."""
    if location.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(location).path))
    return Path(location) if location.startswith("/") else None


def relocate_artifacts(uri: str, here: Path) -> list[str]:
    """Point the SQLite store at the artifacts of a moved project folder.

    MLflow records absolute artifact locations: each experiment's folder and, per run, the
    folder under it. Once the project folder is moved, the store still names the old place:
    MLflow finds no copy of any table there (which read as "MLflow has no copy"), and every new
    run's artifacts would be written to the old path, making it again outside the project. An
    experiment laid out as the harness makes it (``<old>/mlartifacts/<study>``, see
    tracking.artifact_location) whose folder no longer exists is pointed, with its runs, at
    ``here/<study>`` (``here`` the project's mlartifacts). Returns one message per experiment
    moved, saying from where to where and how many runs' artifacts are there."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return []
    messages = []
    try:
        with closing(sqlite3.connect(path, timeout=store_wait())) as db:
            experiments = db.execute("SELECT experiment_id, name, artifact_location FROM experiments").fetchall()
            for experiment_id, name, location in experiments:
                old = local_folder(location or "")
                new = Path(here) / name
                if old is None or old.name != name or old.parent.name != ARTIFACTS_FOLDER or old == new:
                    continue
                if old.exists():
                    continue
                new_location = new.as_uri() if location.startswith("file:") else str(new)
                runs = db.execute(
                    "SELECT run_uuid FROM runs WHERE experiment_id = ? AND substr(artifact_uri, 1, length(?)) = ?",
                    (experiment_id, location, location),
                ).fetchall()
                with db:  # one transaction: the experiment and its runs move together
                    db.execute(
                        "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                        (new_location, experiment_id),
                    )
                    db.execute(
                        "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, length(?) + 1) "
                        "WHERE experiment_id = ? AND substr(artifact_uri, 1, length(?)) = ?",
                        (new_location, location, experiment_id, location, location),
                    )
                found = sum((new / run_id).is_dir() for (run_id,) in runs)
                text = (
                    f"the MLflow store {path} kept the artifacts of study {name} under {old}, which no longer "
                    f"exists (the project folder was moved): it now points at {new}, where {found} of its "
                    f"{len(runs)} run(s) have theirs"
                )
                if found < len(runs):
                    text += f"; the artifacts of the other {len(runs) - found} are in neither place"
                messages.append(text)
    except sqlite3.Error:  # a store MLflow will say more about (check_store has looked at it)
        return messages
    return messages


def unreachable_artifacts(uri: str, study: str) -> dict[str, Path]:
    """Run keys of ``study`` whose FINISHED MLflow run keeps its artifacts in a local folder
    that does not exist (moved or deleted), each with that folder: MLflow cannot give their
    tables back. Only a SQLite store is looked at (a server keeps its own artifacts)."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return {}
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT tags.value, runs.artifact_uri FROM runs "
                "JOIN experiments ON experiments.experiment_id = runs.experiment_id "
                "JOIN tags ON tags.run_uuid = runs.run_uuid AND tags.key = 'run_key' "
                "WHERE experiments.name = ? AND runs.status = 'FINISHED' AND runs.lifecycle_stage = 'active'",
                (study,),
            ).fetchall()
    except sqlite3.Error:
        return {}
    out: dict[str, Path] = {}
    reachable: set[str] = set()
    for key, location in rows:
        folder = local_folder(location or "")
        if folder is not None and not folder.exists():
            out.setdefault(key, folder)
        else:
            reachable.add(key)
    return {key: folder for key, folder in out.items() if key not in reachable}


LOCK_WAIT_SECONDS = 30.0  # another process's write (MLflow's own, `mlflow ui`) ends within seconds
SERVER_TIMEOUT_SECONDS = 5.0


def store_wait() -> float:
    """Seconds a lock or a server that does not answer is waited out (``DDPM_ABLATE_STORE_WAIT``)."""
    return float(os.environ.get("DDPM_ABLATE_STORE_WAIT", LOCK_WAIT_SECONDS))


def probe_store(uri: str) -> None:
    """Raise ValueError, in one line naming the store, when it cannot be written: a server
    that does not answer (MLflow's client would retry for minutes), a SQLite store in a
    read-only place, or one another process keeps locked past ``LOCK_WAIT_SECONDS``
    (``DDPM_ABLATE_STORE_WAIT``). Asked before any slot starts, so nothing trains for a
    store that would refuse its records."""
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
        return
    if "://" not in uri and not uri.startswith("file:"):
        # MLflow would take it as a file store folder, which it no longer writes
        raise ValueError(
            f"MLFLOW_TRACKING_URI={uri!r} is not a tracking URI: use sqlite:///path/mlflow.db, "
            "http(s)://host:port of an `mlflow server`, or a database URL"
        )
    path = sqlite_path(uri)
    if path is None:
        return  # another backend (a database URL): MLflow's client says what is wrong with it
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):  # SQLite writes its journal beside the store
        raise ValueError(
            f"the MLflow store {path} is in a folder this process cannot write ({folder}): make it writable, "
            "or set MLFLOW_TRACKING_URI to a store elsewhere"
        )
    if not path.exists():
        return
    if not os.access(path, os.W_OK):
        raise ValueError(
            f"the MLflow store {path} is read-only: make it writable, or set MLFLOW_TRACKING_URI to another store"
        )
    wait = store_wait()
    try:
        with closing(sqlite3.connect(path, timeout=wait)) as db:
            db.execute("BEGIN IMMEDIATE")  # waits up to ``wait`` for another writer to finish
            db.rollback()
    except sqlite3.OperationalError as error:
        if "locked" not in str(error) and "busy" not in str(error):
            return  # damage, not a lock: check_store repairs or replaces it
        raise ValueError(
            f"the MLflow store {path} is locked by {holders(path) or 'another process'} "
            f"(waited {wait:.0f} s): let it finish or stop it, then run again"
        ) from None


def _probe_server(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_SECONDS).close()
    except urllib.error.HTTPError:
        return  # it answered; what it said is MLflow's client's to judge
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise ValueError(
            f"the MLflow tracking server {uri} did not answer within {SERVER_TIMEOUT_SECONDS:.0f} s ({reason}): "
            "start it, or set MLFLOW_TRACKING_URI to a store that answers"
        ) from None


def holders(path: Path) -> str:
    """The other processes holding a lock on ``path`` (SQLite's are POSIX locks, listed in
    /proc/locks by inode), else those with it open, as "process 123 (python x.py)"; "" where
    /proc cannot tell (another OS, another user's processes)."""
    target = str(path.resolve())
    pids: list[int] = []
    try:
        inode = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
                pids.append(int(fields[4]))
    except OSError:
        pass
    if not pids:
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                    pids.append(int(fd_dir.parent.name))
            except OSError:
                continue
    found = []
    for pid in dict.fromkeys(p for p in pids if p != os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = ""
        command = " ".join(command.split())  # a `python -c` program spans lines: the message is one
        found.append(f"process {pid} ({command[:80]})" if command else f"process {pid}")
    return ", ".join(found)


# ------------------------------------------------------------------ MLflow calls while slots train

# What a store says while it is busy or out of reach, rather than refusing the request: SQLite's
# lock (MLflow waits 20 s for it per call, then raises "database is locked"), a server that is
# down, restarting or overloaded.
# Two runs of one experiment logging the same data set at once: MLflow looks the (name, digest)
# up, then inserts it if absent, in two steps, so the second insert breaks the unique key
# (PostgreSQL's "dataset_pk", SQLite's and MySQL's key on datasets). Tried again, the lookup
# finds the winner's row and links it: nothing is wrong but the timing.
DATASET_RACE = r'"dataset_pk"|UNIQUE constraint failed: datasets\.|Duplicate entry .* for key \'datasets\.'
TRANSIENT = re.compile(
    r"database (?:table )?is locked|busy|connection|timed? ?out|max retries|temporarily unavailable|"
    r"\b(?:429|502|503|504)\b|" + DATASET_RACE,
    re.I,
)
ERRNO = re.compile(r"\[Errno -?\d+\] [^'\"()\[\]]+")
# MLflow logs a failed call with its traceback before it raises (a second copy of what
# GuardedClient says in one line)
MLFLOW_ERROR_LOGGERS = ("mlflow.store.db.utils",)


class StoreFailure(Exception):
    """An MLflow call the store failed for good: refused it, or was still locked or did not
    answer after ``store_wait()`` seconds. The message is one line naming the store and why."""


def transient(error: BaseException) -> bool:
    return TRANSIENT.search(str(error)) is not None


def failure_cause(error: BaseException) -> str:
    """The system's or the store's own reason, one line: "[Errno 111] Connection refused",
    "(sqlite3.OperationalError) attempt to write a readonly database"."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    database = _database_error(error)
    if database is not None:
        # the driver's own words: SQLAlchemy's text can open with its own remark instead
        # ("(raised as a result of Query-invoked autoflush; ...)", the lock on a later line)
        first_line = (str(database).strip().splitlines() or [""])[0]
        return f"({type(database).__module__}.{type(database).__name__}) {first_line}"[:300]
    text = str(error)
    errno = ERRNO.search(text)
    if errno is not None:  # MLflow's HTTP errors wrap urllib3's, which wrap the system's
        return errno.group(0).strip()
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return line[:300]


def _database_error(error: BaseException) -> BaseException | None:
    """The database driver's exception behind ``error`` (MLflow wraps SQLAlchemy's, which
    keeps the driver's as ``orig``), if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        orig = getattr(error, "orig", None)
        if isinstance(orig, BaseException):
            return orig
        error = error.__cause__ or error.__context__
    return None


def describe_failure(uri: str, error: BaseException, waited: float) -> str:
    cause = failure_cause(error)
    path = sqlite_path(uri)
    if path is not None and re.search(r"locked|busy", cause, re.I):
        return f"the MLflow store {path} is locked by {holders(path) or 'another process'} (waited {waited:.0f} s)"
    if uri.startswith(("http://", "https://")) and transient(error):
        return f"the MLflow tracking server {uri} stopped answering ({cause}; waited {waited:.0f} s)"
    return f"the MLflow store {path or uri} failed: {cause}"


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_mlflow_errors() -> None:
    """Leave MLflow's own error logs (tracebacks) out: the caller says each failure in one line."""
    for name in MLFLOW_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropErrors) for f in logger.filters):
            logger.addFilter(_DropErrors())


class GuardedClient:
    """The MlflowClient of the process that records runs while slots train (the single writer,
    harness.launch.slots). A call the store cannot take now, because another process holds its
    lock or the server does not answer, is tried again for up to ``store_wait()`` seconds; a
    call it refuses or still cannot take raises StoreFailure, one line naming the store and the
    cause (and a lock's holder). From then on every call raises that failure at once
    (``failure``): the store is not waited for again per event, results/ keeps the records and
    the next `harness run` writes them into MLflow (harness.runs.reconcile).

    MLflow's HTTP client would retry a request for about four minutes by itself
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES = 7, doubling waits): here it tries once, unless the
    environment says otherwise, so that the wait above is the bound. Only calls made through
    it are guarded: its trackers log metrics synchronously (tracking.RunTracker), since a batch
    handed to MLflow's asynchronous logger fails in a thread of MLflow's, past any bound."""

    def __init__(self, client, uri: str, wait: float | None = None):
        self._client, self.uri = client, uri
        self.wait = store_wait() if wait is None else wait
        self.failure: StoreFailure | None = None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(10.0, self.wait))))
        quiet_mlflow_errors()

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        return partial(self.call, attribute) if callable(attribute) else attribute

    def call(self, method, *args, **kwargs):
        if self.failure is not None:
            raise self.failure
        started = time.monotonic()
        while True:
            try:
                return method(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - whatever the store raised becomes one line
                waited = time.monotonic() - started
                if transient(error) and waited < self.wait:
                    time.sleep(min(1.0, self.wait - waited))
                    continue
                self.failure = StoreFailure(describe_failure(self.uri, error, waited))
                raise self.failure from error
