"""Claims: a training is held by one process while it runs, so two `harness run` (of one study,
or of two studies that share a training) never train it twice.

A claim is an exclusive ``flock`` on ``results/.claims/<train_key>.lock``, under the results
root that every study shares (a run key finished in one study is another study's to adopt, and
a training is shared by every run key that measures it: harness.runs.checkpoints). It is taken
without waiting and held until the process releases it or ends. The operating system releases
it when the holder exits, however it exits (SIGKILL included), so there is no stale claim to
expire. The file records who holds it (host, pid, study, since) for the message the other
process prints. One process may claim several run keys of one training: the lock is taken
once and released with the last of them. Works on a local disk and on NFSv4 (a shared results
folder on a cluster); the distributed path claims through the Optuna queue instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

from ..study.plan import RunSpec

FOLDER = ".claims"  # a dot name: never taken for a study folder (study names start with a letter)


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as its lock file says."""

    text: str  # "pid 123 on host since ..." for messages
    study: str  # the holder's study ("" when the file does not say)


class KeyClaims:
    def __init__(self, results: Path, study: str):
        self.folder = Path(results) / FOLDER
        self.study = study
        self.locks: dict[str, IO] = {}  # train key -> its open, locked file
        self.held: dict[str, str] = {}  # run key -> train key

    def acquire(self, specs: list[RunSpec]) -> tuple[list[RunSpec], list[tuple[RunSpec, Holder]]]:
        """(the specs now claimed by this process, [(spec, who holds it)] for the others)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        mine, others = [], []
        for spec in specs:
            trained = spec.train_key
            if trained not in self.locks:
                holder = self._lock(trained)
                if holder is not None:
                    others.append((spec, holder))
                    continue
            self.held[spec.key] = trained
            mine.append(spec)
        return mine, others

    def _lock(self, trained: str) -> Holder | None:
        """Take the lock of one training; None when taken, else who holds it."""
        handle = open(self.folder / f"{trained}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.write(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "study": self.study, "since": since})
        )
        handle.flush()
        self.locks[trained] = handle
        return None

    def release(self, key: str | None = None) -> None:
        """Release one run key's claim (or all): the lock goes with the closed file once no
        other key of this process uses the same training."""
        for k in [key] if key is not None else list(self.held):
            trained = self.held.pop(k, None)
            if trained is not None and trained not in self.held.values():
                handle = self.locks.pop(trained, None)
                if handle is not None:
                    handle.close()


def wait_until_free(
    results: Path, specs: list[RunSpec], say: Callable[[str], None], poll: float = 2.0, timeout: float | None = None
) -> bool:
    """Block until no other process holds the trainings of ``specs`` (their holders finished
    or died); True when free, False at ``timeout``. Takes no claim: the caller claims as usual."""
    probe = KeyClaims(results, "")
    deadline = None if timeout is None else time.monotonic() + timeout
    said = False
    while True:
        mine, others = probe.acquire(specs)
        probe.release()
        if not others:
            return True
        if not said:
            say(f"waiting for {len(others)} run(s) another study's process is training: {others[0][1].text}")
            said = True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll)


def _holder(text: str) -> Holder:
    try:
        info = json.loads(text)
        study = str(info.get("study", ""))
        where = f" (study {study})" if study else ""
        return Holder(f"pid {info['pid']} on {info['host']}{where} since {info['since']}", study)
    except (ValueError, KeyError, TypeError, AttributeError):
        return Holder("another process", "")


# A study-level file (study.json, hypotheses.parquet) is written in milliseconds: a temp file
# of one this old was left by a process that died mid-write.
STALE_STUDY_TEMP_SECONDS = 600.0


def remove_stale_temps(results: Path, study: str, claimed: list[RunSpec]) -> list[Path]:
    """Delete the temp files a killed process left (ddpm_engine.files.atomic_write names them
    ``<target>.<random>.tmp``) that no live process can be writing: those of the keys and
    trainings this process now holds the claim of, and study-level ones older than
    STALE_STUDY_TEMP_SECONDS. Returns what was removed."""
    folder = Path(results) / study
    if not folder.is_dir():
        return []
    candidates: list[Path] = []
    for spec in claimed:
        candidates += folder.glob(f"*/{spec.key}.*.tmp")
        candidates += (folder / "checkpoints" / spec.train_key).glob("*.tmp")
    now = time.time()
    for path in folder.glob("*.tmp"):
        try:
            if now - path.stat().st_mtime > STALE_STUDY_TEMP_SECONDS:
                candidates.append(path)
        except OSError:
            continue
    removed = []
    for path in candidates:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed
