"""What the commands print about a study's runs: the ledger's set-aside files, the table of
runs (the end of `harness run`, `harness status`) and where the report was written."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..runs.ledger import Ledger
from ..store.states import RunState
from ..study.plan import RunSpec
from ..study.spec import Study
from ..terminal import console, fail_input


def ledger_of(results: Path, study: Study) -> Ledger:
    ledger = Ledger.load(results, study.study)
    for path in ledger.quarantined:
        console.print(
            f"[yellow]unreadable {escape(str(path))}: set aside as {escape(path.name)}.corrupt; "
            "its run counts as not done and runs again[/]"
        )
    return ledger


def print_summary(specs: list[RunSpec], ledger: Ledger) -> None:
    table = Table(title="runs", title_justify="left")
    for column in ("arm", "seed", "run key", "status", "seconds", "note"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        row, state = ledger.row(spec.key), ledger.state(spec.key)
        color = {RunState.FINISHED: "green", RunState.FAILED: "red"}.get(state, "yellow")
        seconds = row.get("seconds")
        table.add_row(
            escape(spec.arm.label),
            str(spec.seed),
            spec.key,
            f"[{color}]{state}[/]",
            f"{seconds:.0f}" if isinstance(seconds, float) and seconds == seconds else "",
            escape(_text(row.get("error")) or _text(row.get("note"))),
        )
    console.print(table)


def _text(value) -> str:
    """A text cell of the `runs` table: "" for None and for the NaN of rows written before its column."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def write_report(study: str, results: Path, reports: Path) -> None:
    from .page import ReportError, build_report

    try:
        path = build_report(study, results, reports)
    except FileNotFoundError:
        fail_input(ValueError(f"no results for study {study!r} under {results}: run it first (`harness run STUDY`)"))
    except ReportError as error:
        fail_input(error)
    except OSError as error:  # reports/ read-only, a full disk
        from ddpm_engine.files import write_error_message

        fail_input(ValueError(write_error_message(error)))
    console.print(f"report: {path}")
