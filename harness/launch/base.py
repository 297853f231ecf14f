"""What every launcher is: given a loaded study and its run specs, run (or enqueue) the pending
keys somewhere and say how they ended, as an exit code. `harness run --launcher` picks one;
the options every launcher takes are one LaunchOptions; a launcher's own options are its
constructor's other arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..study.plan import RunSpec
from ..study.spec import Study


@dataclass(frozen=True)
class LaunchOptions:
    """What `harness run` tells every launcher, whichever it is. A launcher that cannot honour
    one (--workers or --rerun on a queue) refuses it in ``check`` or ``launch``."""

    results: Path
    reports: Path | None = None  # None: no report page at the end
    device: str = "auto"
    workers: int | None = None  # None: the launcher's own choice
    rerun: bool = False
    retry_failed: bool = False


class Launcher(ABC):
    """Runs a study's run specs somewhere and says how they ended."""

    def __init__(self, options: LaunchOptions):
        self.options = options

    def check(self, study: Study, chosen: set[str] | None) -> None:
        """Raise ``ValueError`` (or ``StudyError``) for what this launcher cannot run, once the
        study is loaded and before anything is prepared for it; ``chosen`` are the --arm labels
        (None: every arm). A launcher that can run any study refuses nothing."""
        return None

    @abstractmethod
    def launch(self, study: Study, specs: list[RunSpec]) -> int:
        """Run (or enqueue) the pending keys of ``specs``; return the exit code:
        0 all finished, 1 some failed, 130 stopped (run the same command again to resume).
        Bad input, or a store that cannot be used, ends the command with exit 2 instead
        (harness.terminal.fail_input)."""
