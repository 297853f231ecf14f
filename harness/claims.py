"""Claims: a run key is held by one process while it trains, so two `harness run` of one study
(two terminals, a rerun while one is going) never train the same key twice.

A claim is an exclusive ``flock`` on ``results/<study>/claims/<run_key>.lock``, taken without
waiting and held until the process ends. The operating system releases it when the holder
exits, however it exits (SIGKILL included), so there is no stale claim to expire. The file
records who holds it (host, pid, since) for the message the other process prints. Works on a
local disk and on NFSv4 (a shared results folder on a cluster); the distributed path claims
through the Optuna queue instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from .plan import RunSpec


class KeyClaims:
    def __init__(self, results: Path, study: str):
        self.folder = Path(results) / study / "claims"
        self.held: dict[str, IO] = {}

    def acquire(self, specs: list[RunSpec]) -> tuple[list[RunSpec], list[tuple[RunSpec, str]]]:
        """(the specs now claimed by this process, [(spec, who holds it)] for the others)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        mine, others = [], []
        for spec in specs:
            handle = open(self.folder / f"{spec.key}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                others.append((spec, _holder(handle.read())))
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(
                json.dumps(
                    {
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    }
                )
            )
            handle.flush()
            self.held[spec.key] = handle
            mine.append(spec)
        return mine, others

    def release(self, key: str | None = None) -> None:
        """Release one claim (or all): the lock goes with the closed file."""
        for k in [key] if key is not None else list(self.held):
            handle = self.held.pop(k, None)
            if handle is not None:
                handle.close()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
