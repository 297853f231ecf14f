"""The local launcher: a study's runs on slots of this machine (harness.launch.slots).

Before the slots start, the MLflow store is checked (and mended), damaged tables of finished
keys are repaired, the keys to run are claimed from other processes and keys finished in
other studies adopted; while they run, progress is shown and Ctrl-C stops them at a
checkpoint; after them, the summary and the report. With adaptive seeds, rounds of runs
alternate with looks at the hypotheses (harness.study.sequential) until they stop.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..report.summary import ledger_of, print_summary, write_report
from ..runs.repair import open_tracking_client, repair_study
from ..store.states import RunState
from ..study.plan import RunSpec, study_manifest, write_manifest
from ..study.spec import Study
from ..terminal import console, fail_input
from .base import Launcher, LaunchOptions
from .rounds import first_round, next_seeds, planned_specs


class LocalLauncher(Launcher):
    """Runs the pending keys on slots of this machine, in rounds while adaptive seeds grow, then
    prints the summary and builds the report (``reports`` None: no report)."""

    def __init__(self, options: LaunchOptions, *, arms: list[str] | None = None):
        super().__init__(options)
        self.chosen = set(arms) if arms else None  # None: every arm

    def launch(self, study: Study, specs: list[RunSpec]) -> int:
        o = self.options
        try:
            return _run_locally(
                study, specs, self.chosen, o.results, o.reports, o.device, o.workers, o.rerun, o.retry_failed
            )
        except OSError as error:  # results/ read-only, a full disk: one line naming the file, exit 2
            from ddpm_engine.files import write_error_message

            fail_input(ValueError(write_error_message(error)))


def _run_locally(study, specs, chosen, results, reports, device, workers, rerun, retry_failed) -> int:
    """Run the study's pending keys on local slots, then summarise, report and exit with the
    study's state (0 all finished, 1 some failed, 130 stopped). With adaptive seeds, rounds
    of runs alternate with looks at the hypotheses (harness.study.sequential) until they stop."""
    wanted = None if study.adaptive is None else first_round(study, specs)
    ran_here: set[str] = set()  # --rerun reruns each key once, not once per round
    write_manifest(results, study_manifest(study, specs))
    while True:
        planned = specs if wanted is None else planned_specs(specs, wanted)
        outcomes, waiting = _run_round(study, planned, chosen, results, device, workers, rerun, retry_failed, ran_here)
        stopped = any(o.state in (RunState.INTERRUPTED, RunState.PENDING) for o in outcomes)
        if waiting and not stopped:
            # trainings another study is running: wait for them, then adopt or measure them
            # (the next round finds them finished) instead of training them a second time
            stopped = not _wait_for(results, waiting)
            if not stopped:
                continue
        if wanted is None or stopped:
            break
        following = next_seeds(study, specs, results, wanted)
        if following == wanted:
            break
        wanted = following
    final = ledger_of(results, study)
    print_summary(planned, final)
    if reports is not None:
        write_report(study.study, results, reports)
    if stopped:
        console.print("[yellow]stopped: run the same command again to resume[/]")
        return 130
    if any(final.state(s.key) is RunState.FAILED for s in planned):
        return 1
    return 0


def _run_round(study, specs, chosen, results, device, workers, rerun, retry_failed, ran_here: set[str]):
    """Run the keys of ``specs`` not yet finished (all of them once with --rerun); return their
    outcomes and the specs whose training another study's process holds (to wait for). The
    sampler check is recorded after them."""
    from ..runs.sampler_checks import record_sampler_checks
    from .slots import LocalScheduler, slot_devices

    done_in_mlflow, lost_in_mlflow = _check_tracking_store(study)
    done_in_mlflow -= repair_study(results, study.study, specs, open_tracking_client, console.print, measure=True)
    ledger = ledger_of(results, study)
    todo, skipped = ledger.todo(specs, rerun=rerun, retry_failed=retry_failed, chosen=chosen)
    todo = [s for s in todo if s.key not in ran_here]
    remeasured: list[RunSpec] = []
    if not rerun:  # a key MLflow finished is restored from it below, never trained again
        todo = [s for s in todo if s.key not in done_in_mlflow]
        remeasured = _outdated(study, ledger.outdated(specs, chosen), results, ran_here)
        todo += remeasured
    lost = [s for s in todo if s.key in lost_in_mlflow]  # finished in MLflow, which cannot give them back
    _say_lost_artifacts(lost, lost_in_mlflow)
    claims, todo, held = _claim(study, results, todo, rerun)  # held while this function runs
    waiting = [spec for spec, who in held if who.study and who.study != study.study]
    try:
        from ..runs.reuse import finished_elsewhere, sound_sources

        reusable = {} if rerun else finished_elsewhere(results, study.study, [s.key for s in todo])
        reusable = sound_sources(results, reusable, todo, open_tracking_client, console.print)
        adopted = [s for s in todo if s.key in reusable]
        todo = [s for s in todo if s.key not in reusable]
        if not rerun:
            _copy_trainings(study, todo, results)
        _say_shared_trainings(todo)
        try:
            slots = slot_devices(device, workers, runs=len(todo))
        except ValueError as error:
            fail_input(error)
        scheduler = LocalScheduler(
            todo,
            results,
            slots,
            fresh_keys={s.key for s in todo} if rerun else set(),
            # a re-measured run gets a new MLflow run: logging into the old one gave each final
            # metric twice at the same step
            replaced_keys={s.key for s in remeasured + lost},
        )
        scheduler.start()  # slots never touch MLflow: they start training while MLflow loads
        make_tracker, client, experiment_id = _open_tracking(study, results, scheduler)
        held_text = f", {len(held)} held by another process" if held else ""
        console.print(
            f"[bold]{study.study}[/]: {len(specs)} runs, {len(todo)} to run{held_text}, "
            f"{len(specs) - len(todo) - len(held)} already done, failed or not chosen; {len(slots)} slot(s) on "
            f"{slots[0][0]}; MLflow {client.tracking_uri}"
        )
        _reconcile(client, experiment_id, specs, results, claims, todo + adopted, scheduler)
        if adopted:
            _adopt(adopted, reusable, results, client, experiment_id, scheduler)
        if any(why == RunState.FAILED for _, why in skipped):
            console.print("[yellow]failed runs are not retried without --retry-failed[/]")
        outcomes = _run_with_progress(scheduler, todo, make_tracker) if todo else []
        ran_here.update(s.key for s in todo)
        if scheduler.store_failure is not None:
            _stop_for_store(study, specs, results, scheduler.store_failure, outcomes)
        _stop_if_disk_full(study, outcomes)
        # after the runs: the parent must record the slots' first events at once (a run killed
        # early must already have its MLflow run to resume), and only the report needs this
        record_sampler_checks(results, study.study, specs)
    finally:
        claims.release()
    return outcomes, waiting


def _outdated(study: Study, outdated: list[RunSpec], results: Path, ran_here: set[str]) -> list[RunSpec]:
    """Finished keys measured under an older MEASURE_VERSION whose training is on disk (here or
    in another study): measured again from it, not trained. Those without one are kept as
    they are and named: retraining them is --rerun's decision, not a side effect."""
    from ddpm_engine.metrics import MEASURE_VERSION

    from ..runs.checkpoints import has_checkpoint, trained_elsewhere, untrained

    outdated = [s for s in outdated if s.key not in ran_here]
    if not outdated:
        return []
    elsewhere = trained_elsewhere(results, study.study, outdated)
    again = [s for s in outdated if untrained(s) or has_checkpoint(results, s) or s.key in elsewhere]
    kept = [s for s in outdated if s not in again]
    if again:
        console.print(
            f"re-measuring {len(again)} finished run(s) from their final checkpoints (measured under an older "
            f"version; this code measures as version {MEASURE_VERSION}): no training",
            highlight=False,
        )
    if kept:
        shown = ", ".join(s.name for s in kept[:8]) + (" ..." if len(kept) > 8 else "")
        console.print(
            f"[yellow]{len(kept)} finished run(s) were measured under an older version and have no checkpoint "
            f"to measure again from; kept as they are (--rerun trains them again):[/] {escape(shown)}",
            highlight=False,
        )
    return again


def _copy_trainings(study: Study, todo: list[RunSpec], results: Path) -> None:
    """Trainings finished in other studies copied in (harness.runs.checkpoints): the runs that use
    them are measured, not trained again."""
    from ..runs.checkpoints import copy_checkpoint, trained_elsewhere

    found = trained_elsewhere(results, study.study, todo)
    for spec in todo:
        if spec.key in found:
            copy_checkpoint(results, spec, found[spec.key][1])
    if found:
        shown = ", ".join(f"{s.name} ({found[s.key][0]})" for s in todo if s.key in found)
        console.print(
            f"{len(found)} run(s) start from a training finished in another study (same training config and "
            f"seed): measured, not trained again: {escape(shown[:600])}",
            highlight=False,
        )


def _say_lost_artifacts(lost: list[RunSpec], folders: dict[str, Path]) -> None:
    """Keys MLflow finished whose artifacts folder is gone and which results/ does not hold:
    nothing can restore them, so they run again (measured from a checkpoint where one is on
    disk), each into a new MLflow run; never "finished" without their tables."""
    if not lost:
        return
    where = sorted({str(folders[s.key].parent.parent) for s in lost})
    shown = ", ".join(s.name for s in lost[:8]) + (" ..." if len(lost) > 8 else "")
    console.print(
        f"[yellow]{len(lost)} run(s) MLflow finished have neither tables in results/ nor their MLflow artifacts "
        f"(the store keeps them under {escape(', '.join(where))}, which does not exist: moved or deleted); "
        f"run again, each into a new MLflow run:[/] {escape(shown)}",
        highlight=False,
        soft_wrap=True,
    )


def _say_shared_trainings(todo: list[RunSpec]) -> None:
    """Runs of this study that differ only in how they are measured train once."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in todo:
        groups.setdefault(spec.train_key, []).append(spec)
    shared = [g for g in groups.values() if len(g) > 1]
    if shared:
        shown = "; ".join(" = ".join(s.name for s in g) for g in shared[:5])
        console.print(
            f"{sum(len(g) - 1 for g in shared)} run(s) differ from another only in sample.* or eval.*: "
            f"trained once, each measured from that training ({escape(shown)})",
            highlight=False,
        )


def _adopt(specs: list[RunSpec], sources: dict[str, str], results: Path, client, experiment_id: str, scheduler) -> None:
    """Finished runs of other studies with the same run key, made this study's (harness.runs.reuse).
    An MLflow store that fails meanwhile stops the started slots and is one line, exit 2: an
    adoption cut short leaves its key pending, adopted again next time."""
    from ..runs.reuse import adopt
    from ..store.mlflow_store import StoreFailure
    from ..store.tracking import git_commit

    commit = git_commit()
    for spec in specs:
        try:
            adopt(client, experiment_id, spec, results, sources[spec.key], commit)
        except StoreFailure as failure:
            scheduler.abort()
            fail_input(ValueError(f"{failure} while adopting runs of other studies; run again once it works"))
    shown = ", ".join(f"{spec.name} ({sources[spec.key]})" for spec in specs[:10]) + (" ..." if len(specs) > 10 else "")
    console.print(
        f"reused {len(specs)} finished run(s) from other studies instead of training them: {escape(shown)}",
        highlight=False,
    )


def _claim(study: Study, results: Path, todo: list[RunSpec], rerun: bool):
    """Claim the trainings this process will run (harness.runs.claims); those another process holds
    are left to it, named, and returned with their holders (a holder of another study is
    waited for, then adopted from). A key finished by another process since the ledger was
    read is dropped."""
    from ..runs.claims import KeyClaims, remove_stale_temps

    claims = KeyClaims(results, study.study)
    mine, held = claims.acquire(todo)
    removed = remove_stale_temps(results, study.study, mine)
    if removed:
        console.print(f"removed {len(removed)} temp file(s) a killed run left half written", highlight=False)
    if held:
        shown = ", ".join(f"{spec.name} ({who.text})" for spec, who in held[:5]) + (" ..." if len(held) > 5 else "")
        console.print(
            f"[yellow]{len(held)} run(s) are being run by another harness process and are left to it:[/] {escape(shown)}"
        )
    if not rerun:
        now = ledger_of(results, study)
        finished = [s for s in mine if now.is_current(s.key)]
        for spec in finished:
            claims.release(spec.key)
        mine = [s for s in mine if not now.is_current(s.key)]
    return claims, mine, held


def _wait_for(results: Path, specs: list[RunSpec]) -> bool:
    """Wait for other processes' claims on ``specs`` to go; False on Ctrl-C."""
    from ..runs.claims import wait_until_free

    try:
        return wait_until_free(results, specs, lambda text: console.print(escape(text), highlight=False))
    except KeyboardInterrupt:
        return False


def _check_tracking_store(study: Study) -> tuple[set[str], dict[str, Path]]:
    """Before any training: a half-made SQLite store repaired or replaced (harness.store.mlflow_store),
    said in one message, and pointed at the artifacts of a moved project folder; then the run
    keys of the study the store has finished with its artifacts at hand, and those whose
    artifact folder is gone (with the folder)."""
    from ..store.mlflow_store import check_store, finished_keys, probe_store, tracking_uri, unreachable_artifacts

    uri = tracking_uri()
    try:
        probe_store(uri)
        found = check_store(uri)
    except ValueError as error:
        fail_input(error)
    if found.message:
        console.print(f"[yellow]{escape(found.message)}[/]")
    relocate_artifacts_saying(uri)
    # the first contact through MLflow's client: its default is minutes of retries per request
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update({name: value for name, value in quick.items() if saved[name] is None})
    try:
        lost = unreachable_artifacts(uri, study.study)
        return finished_keys(uri, study.study) - set(lost), lost
    except Exception as error:  # noqa: BLE001 - an unknown scheme, a refused database URL
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        fail_input(ValueError(f"cannot use the MLflow tracking store {uri}: {type(error).__name__}: {first_line}"))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def relocate_artifacts_saying(uri: str) -> None:
    """A moved project folder: the store pointed at its artifacts where they are now, said."""
    from ..store.mlflow_store import ARTIFACTS_FOLDER, relocate_artifacts

    for message in relocate_artifacts(uri, Path.cwd() / ARTIFACTS_FOLDER):
        console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)  # paths unbroken


def _reconcile(client, experiment_id, specs, results, claims, todo, scheduler) -> None:
    """MLflow and results/ mended from each other for the keys not run now (harness.runs.reconcile).
    A write that fails stops the started slots (and exits 2); any other failure is said and
    the study goes on: the runs are recorded either way."""
    from ..runs.reconcile import reconcile
    from ..store.mlflow_store import StoreFailure

    try:
        reconcile(client, experiment_id, specs, results, claims, {s.key for s in todo}, console.print)
    except OSError:
        scheduler.abort()
        raise
    except StoreFailure as failure:  # the store the runs are to be recorded in: nothing would be
        scheduler.abort()
        fail_input(ValueError(f"{failure} while mending it from {results}; run again once it works"))
    except Exception as error:  # noqa: BLE001 - mending is a service, not a precondition
        console.print(
            f"[yellow]could not reconcile MLflow with {escape(str(results))}: {type(error).__name__}: "
            f"{escape(str(error)[:300])}[/]"
        )


def _stop_if_disk_full(study: Study, outcomes: list) -> None:
    """Exit 2 when a run failed for a full disk: the other runs stopped at their checkpoints,
    and nothing more (the report included) can be written."""
    from ddpm_engine.files import DISK_FULL

    full = [o for o in outcomes if o.state is RunState.FAILED and DISK_FULL in o.outcome.reason]
    if full:
        reason = full[0].outcome.reason
        fail_input(
            ValueError(
                f"{reason[reason.index(DISK_FULL) :]} (run {full[0].spec.name}); free some space, then "
                f"`harness run {study.source} --retry-failed` reruns the runs it failed"
            )
        )


def _open_tracking(study: Study, results: Path, scheduler):
    """(a RunTracker factory, the MLflow client, the study's experiment id); an unusable store
    stops the started slots (their runs resume next time) and is bad input, exit 2. The client
    waits out a lock or a server that does not answer for a bounded time, then fails in one
    line (``store.GuardedClient``); the scheduler then stops the slots (``_stop_for_store``)."""
    from ..store.mlflow_store import GuardedClient, StoreFailure
    from ..store.tracking import RunTracker, ensure_experiment, git_commit, make_client, tracking_uri

    try:
        client = GuardedClient(make_client(), tracking_uri())
        experiment_id = ensure_experiment(client, study.study, study.question)
        commit = git_commit()
    except StoreFailure as failure:
        scheduler.abort()
        fail_input(ValueError(str(failure)))
    except Exception as error:  # a wrong MLFLOW_TRACKING_URI is bad input, not a crash
        scheduler.abort()
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        fail_input(
            ValueError(f"cannot use the MLflow tracking store {tracking_uri()}: {type(error).__name__}: {first_line}")
        )
    except BaseException:
        scheduler.abort()
        raise
    # synchronous: the parent trains nothing, and a failing store is met at the call (RunTracker)
    track = partial(RunTracker, client, experiment_id, results=results, commit=commit, synchronous=True)
    return track, client, experiment_id


def _stop_for_store(study: Study, specs: list[RunSpec], results: Path, failure: Exception, outcomes: list) -> None:
    """The MLflow store failed for good while runs trained: the slots stopped at their
    checkpoints, every run's end is in results/ (Parquet), and the next `harness run` writes
    into MLflow what it lacks (harness.runs.reconcile). The runs' states, then one line, exit 2."""
    print_summary(specs, ledger_of(results, study))
    finished = sum(o.state is RunState.FINISHED for o in outcomes)
    stopped = sum(o.state in (RunState.INTERRUPTED, RunState.PENDING) for o in outcomes)
    fail_input(
        ValueError(
            f"{failure}, while runs were training: {stopped} run(s) stopped at their checkpoints and resume "
            f"at the next `harness run`; {finished} finished run(s) are kept in {results / study.study} and "
            "written to MLflow from there once the store works"
        )
    )


def _run_with_progress(scheduler, todo: list[RunSpec], make_tracker):
    """Run the scheduler with progress: rich bars on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        from ..runs.progress import PlainProgress

        scheduler.on_event = PlainProgress(
            todo, lambda line: console.print(line, markup=False, highlight=False)
        ).on_event
        return _run_until_done(scheduler, make_tracker, console)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        study_task = progress.add_task("study", total=len(todo), info="")
        run_tasks: dict[str, int] = {}

        def on_event(kind: str, spec: RunSpec, payload: tuple) -> None:
            if kind == "started":
                run_tasks[spec.key] = progress.add_task(
                    f"  {escape(spec.name)}", total=spec.config.train.planned_steps(), info="starting"
                )
            elif kind == "scalars" and spec.key in run_tasks:
                step, values = payload
                if "loss" in values:
                    progress.update(
                        run_tasks[spec.key],
                        completed=step,
                        info=f"loss {values['loss']:.4f}  {values.get('images_per_s', 0):.0f} img/s",
                    )
                elif "hist_w1" in values:
                    progress.update(run_tasks[spec.key], info="sampled")
            elif kind in ("ended", "not_started"):
                if spec.key in run_tasks:
                    progress.remove_task(run_tasks.pop(spec.key))
                if kind == "ended":
                    progress.advance(study_task)
                    outcome = payload[0]
                    if outcome.state is RunState.FAILED:
                        progress.console.print(
                            f"[red]failed[/] {escape(spec.name)} ({spec.key}): {escape(outcome.reason)}"
                        )
                    elif outcome.state is RunState.FINISHED and outcome.reason:
                        progress.console.print(
                            f"[yellow]note[/] {escape(spec.name)} ({spec.key}): {escape(outcome.reason)}"
                        )
            elif kind == "store_failed":
                from ..runs.progress import STORE_FAILED

                progress.console.print(f"[yellow]{escape(STORE_FAILED.format(payload[0]))}[/]")

        scheduler.on_event = on_event
        return _run_until_done(scheduler, make_tracker, progress.console)


def _run_until_done(scheduler, make_tracker, out: Console):
    """scheduler.run with Ctrl-C / SIGTERM asking the slots to checkpoint and stop; a second
    stops them at once, their runs recorded as interrupted (they resume from their last
    periodic checkpoint). Neither raises into the recording of an event, which would leave
    it half done; a third Ctrl-C does, for a parent that no longer answers."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_sigint(signum, frame):
        if scheduler.stop_at_once:
            raise KeyboardInterrupt
        if scheduler.stop.is_set():
            out.print("[yellow]Ctrl-C again: stopping now; the running runs resume from their last checkpoint[/]")
            scheduler.request_stop_at_once()
            return
        out.print("[yellow]Ctrl-C: checkpointing the running runs and stopping...[/]")
        scheduler.request_stop()

    for number in previous:
        signal.signal(number, on_sigint)
    try:
        return scheduler.run(make_tracker)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
