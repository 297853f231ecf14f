"""The `harness` command line: plan, run, status and report ablation studies."""

from __future__ import annotations

import difflib
import os
import re
import signal
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ddpm_engine.metrics import REFERENCE_NAMES

from .runs.ledger import Ledger
from .store.states import RunState
from .study.plan import RunSpec, changed_keys, expand, study_manifest, write_manifest
from .study.spec import Study, StudyError, load_study

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Run declarative ablation studies of DDPMs and turn them into evidence.\n\n"
    "Example: `harness run studies/timestep_ablation.yaml`",
)
console = Console()
err_console = Console(stderr=True)

PLAN_ARMS_SHOWN = 40
T_975 = {2: 12.706, 3: 4.303, 5: 2.776}  # two-sided 95% Student-t critical value for n seeds (df = n - 1)
STUDY_ARG = typer.Argument(..., help="A study YAML file, e.g. studies/timestep_ablation.yaml.", show_default=False)
SET_OPT = typer.Option(None, "--set", help="Override the base config: `--set train.steps=500` (repeatable).")
RESULTS_OPT = typer.Option(Path("results"), "--results", help="Folder of Parquet tables and checkpoints.")
REPORTS_OPT = typer.Option(Path("reports"), "--reports", help="Folder of HTML reports.")
STORAGE_OPT = typer.Option(
    None,
    "--storage",
    help="Optuna storage shared by workers on many machines, e.g. `postgresql://user@db-host/optuna`.",
)


def fail_input(error: Exception) -> None:
    """Bad input: one clear message, exit code 2, no traceback."""
    # escaped: a key such as train.[lr] in the message must print as written, not as markup
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def check_device(device: str) -> None:
    """Exit 2 for a device torch would not be asked for: an unknown one was silently run on
    the CPU (`auto`'s choice) by the slots, which only look for "cuda"."""
    # torch builds MPS only on macOS; asking for it elsewhere fails in every slot after the start
    known = "auto, cpu, cuda, cuda:N" + (", mps" if sys.platform == "darwin" else "")
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?" + ("|mps" if sys.platform == "darwin" else ""), device) is None:
        fail_input(ValueError(f"--device {device!r}: not a device; use one of {known}"))


def load(study_path: Path, set_options: list[str] | None) -> tuple[Study, list[RunSpec]]:
    try:
        study = load_study(study_path, set_options or [])
        return study, expand(study)
    except StudyError as error:
        fail_input(error)


def preflight_data(study: Study, specs: list[RunSpec], embedded: bool = True) -> dict:
    """Load every distinct data set once, before anything runs, so that a missing folder is
    reported against the study file (and the decoded cache is warm for the workers), and check
    every arm against its data's size (ddpm_engine.shapes.problems): what would fail only
    after training, or silently do nothing, stops here with exit 2.

    ``embedded=False`` skips loading the digits, which ship with scikit-learn: nothing can be
    missing and their size is known, and `run` would only delay its slots' start by loading
    them (`plan` times training steps on them, so it keeps the default)."""
    from ddpm_engine.shapes import digits_extent, problems

    # one spec per arm: its seeds differ only in train.seed, which nothing here depends on
    first_of_arm: dict[str, RunSpec] = {}
    for spec in specs:
        first_of_arm.setdefault(spec.arm.label, spec)
    arms = list(first_of_arm.values())
    for spec in arms:  # before loading: data.levels beyond uint8 would fail as a data error
        for key, reason in problems(spec.config):
            fail_input(_located(study, spec, [key], reason))
    loaded: dict = {}
    extents: dict[str, tuple[int, int, int | None]] = {}
    for spec in arms:
        key = spec.config.data.model_dump_json()
        if key not in extents:
            if spec.config.data.name == "digits" and not embedded:
                extents[key] = (*digits_extent(spec.config.data), None)
            else:
                from ddpm_engine.data import DataError, load_data

                try:
                    data = loaded[key] = load_data(spec.config.data)
                except DataError as error:
                    keys = [error.key] if error.key else []
                    fail_input(_located(study, spec, [*keys, "data.path", "data.name"], str(error)))
                held = data.heldout.shape[0]  # the loaded split, whichever rule made it
                extents[key] = (data.train.shape[0] + held, data.image_size, held)
        for dotted, reason in problems(spec.config, *extents[key]):
            # a default a preset filled in is located at the preset
            fallbacks = ["model.preset"] if dotted.startswith("model.") else ["data.path", "data.name"]
            fail_input(_located(study, spec, [dotted, *fallbacks], reason))
    return loaded


def _located(study: Study, spec: RunSpec, keys: list[str], message: str) -> StudyError:
    """``message`` at the first of ``keys`` the arm sets: in the ablation level whose value it
    takes, with --set, or in the base; else at the base section of the first key."""
    for key in keys:
        for axis, level in spec.arm.levels.items():
            overrides = study.ablations[axis][level]
            if key in overrides and overrides[key] == spec.arm.overrides.get(key):
                return study.error(("ablations", axis, level, key), message)
        if key in study.set_keys:
            return StudyError("--set", None, key, message)
        if ("base", *key.split(".")) in study.lines:
            return study.error(("base", *key.split(".")), message)
    return study.error(("base", keys[0].split(".")[0]), message)


def ledger_of(results: Path, study: Study) -> Ledger:
    ledger = Ledger.load(results, study.study)
    for path in ledger.quarantined:
        console.print(
            f"[yellow]unreadable {escape(str(path))}: set aside as {escape(path.name)}.corrupt; "
            "its run counts as not done and runs again[/]"
        )
    return ledger


@app.command()
def plan(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    device: str = typer.Option("auto", help="Device to measure the step time on: auto, cpu, cuda."),
    results: Path = RESULTS_OPT,
    measure: bool = typer.Option(True, help="Time a few training steps per distinct model to estimate cost."),
    check: bool = typer.Option(True, help="Run the closed-form sampler check of each schedule and sampler used."),
    all_arms: bool = typer.Option(False, "--all", help=f"List every arm (default: the first {PLAN_ARMS_SHOWN})."),
):
    """Show the expansion (arms x seeds) with parameters and estimated time; runs nothing.

    Example: `harness plan studies/timestep_ablation.yaml --set train.steps=500`
    """
    check_device(device)
    study, specs = load(study_path, set_options)
    # the digits need loading only to time steps; other data are always checked here
    data = preflight_data(study, specs, embedded=measure)
    device_name = "CPU"
    if measure:  # torch loads only when steps are timed (about 2 s)
        from ddpm_engine.device import resolve_device

        from .study.cost import estimate, format_seconds

        dev = resolve_device(device)
        device_name = dev.type.upper()
    ledger = ledger_of(results, study)
    from .runs.reuse import finished_elsewhere

    reusable = finished_elsewhere(results, study.study, [s.key for s in specs if not ledger.is_finished(s.key)])
    measured_only = _measured_only(study, specs, ledger, reusable, results)
    table = Table(title=f"{study.study}: {study.question}", title_justify="left")
    for column in (
        "arm",
        "seeds",
        "changed keys",
        "params",
        f"est. {device_name} time / run",
        "done / reused / to train",
    ):
        table.add_column(column, overflow="fold")
    cache: dict = {}
    total = 0.0
    by_arm: dict[str, list[RunSpec]] = {}
    for spec in specs:
        by_arm.setdefault(spec.arm.label, []).append(spec)
    for index, (arm, arm_specs) in enumerate(by_arm.items()):
        first = arm_specs[0]
        params, seconds = "", ""
        if measure:
            est = estimate(first.config, data[first.config.data.model_dump_json()], dev, cache)
            params, seconds = f"{est.params / 1e6:.2f}M", format_seconds(est.total_seconds)
            trains = [s for s in arm_specs if not ledger.is_finished(s.key) and s.key not in reusable]
            measures = [s for s in arm_specs if s in measured_only]  # sampled, never trained
            total += est.total_seconds * len([s for s in trains if s not in measures])
            total += est.measure_seconds * len(measures)
        if index >= PLAN_ARMS_SHOWN and not all_arms:
            continue  # a table of thousands of rows is unreadable, and rendering it took seconds
        changed = ", ".join(f"{k}={v}" for k, v in changed_keys(study, first).items()) or "(base)"
        finished = sum(ledger.is_finished(s.key) for s in arm_specs)
        reused = sum(s.key in reusable for s in arm_specs)
        measured = sum(s in measured_only and not ledger.is_finished(s.key) for s in arm_specs)
        to_train = len(arm_specs) - finished - reused - measured
        table.add_row(  # arm names and values are the study's text, never rich markup
            escape(arm),
            ",".join(str(s.seed) for s in arm_specs),
            escape(changed),
            params,
            seconds,
            f"{finished} / {reused} / {to_train}" + (f" (+{measured} measured only)" if measured else ""),
        )
    console.print(table)
    if len(by_arm) > PLAN_ARMS_SHOWN and not all_arms:
        console.print(f"... and {len(by_arm) - PLAN_ARMS_SHOWN:,} more arms (`--all` lists them)")
    references = [
        f"{escape(arm)} ({s[0].config.model.preset})"
        for arm, s in by_arm.items()
        if s[0].config.model.preset in REFERENCE_NAMES
    ]
    if references:
        console.print(
            f"reference arms, fitted on the training split and never trained (train.* ignored): {', '.join(references)}"
        )
    if check:
        from .runs.sampler_checks import sampler_check_table

        _print_sampler_checks(sampler_check_table(specs, data))
    adaptive = study.adaptive
    if adaptive is None:
        summary = f"{len(specs)} runs ({len(by_arm)} arms x {len(study.seed_list)} seeds)"
    else:
        summary = (
            f"{len(by_arm) * adaptive.start} to {len(specs)} runs ({len(by_arm)} arms x {adaptive.start} to "
            f"{adaptive.max} adaptive seeds: +{adaptive.batch} at a time to arms with undecided hypotheses)"
        )
    done_here = sum(ledger.is_finished(s.key) for s in specs)
    untrained = sum(not ledger.is_finished(s.key) for s in measured_only)
    summary += f"; {len(specs) - done_here - len(reusable) - untrained} to train, {done_here} done"
    if measured_only:
        summary += f", {len(measured_only)} to measure from finished trainings (no training)"
    if reusable:
        sources = Counter(reusable.values())
        summary += f", {len(reusable)} reused from other studies ({', '.join(f'{k}: {n}' for k, n in sources.items())})"
    if measure:
        summary += f"; estimated {format_seconds(total)} of {dev.type.upper()} time to train"
        if adaptive is not None:
            summary += " at most"
    console.print(summary)
    if len(study.seed_list) < 3:
        _warn_few_seeds(len(study.seed_list))
    if adaptive is not None and not study.hypotheses:
        console.print("[yellow]adaptive seeds without hypotheses: every arm stops at the start seeds[/]")
    if study.tune is not None:
        tune = study.tune
        space = ", ".join(f"{k} ~ {d.kind}{d.extremes()}" for k, d in tune.space.items())
        console.print(
            f"tuned per arm first: {space}; {tune.trials} trials x "
            f"{tune.steps or 'full'} steps per arm, {tune.resolved_direction} {tune.metric}; "
            "run keys above change to the tuned values"
        )


@app.command()
def run(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="CPU slots sharing the cores (default: one per core, at most one per run); on CUDA, at most one per GPU.",
    ),
    device: str = typer.Option("auto", help="auto (CUDA GPUs, else CPU), cpu or cuda."),
    rerun: bool = typer.Option(False, "--rerun", help="Run every key again from scratch (finished ones too)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the failed keys again (finished ones stay)."),
    results: Path = RESULTS_OPT,
    reports: Path = REPORTS_OPT,
    report: bool = typer.Option(True, help="Build the HTML report at the end."),
    storage: Optional[str] = STORAGE_OPT,
    no_work: bool = typer.Option(
        False, "--no-work", help="With --storage: only enqueue the runs; `harness worker` runs them."
    ),
    arm: Optional[list[str]] = typer.Option(
        None, "--arm", help="Run only this arm (repeatable); the others stay pending in the status and the report."
    ),
):
    """Run every arm x seed of a study; finished runs are skipped, interrupted ones resume.

    Examples:

    * `harness run studies/timestep_ablation.yaml`
    * `harness run studies/capacity_ablation.yaml --set train.steps=500 --workers 2`
    * `harness run studies/objective_ablation.yaml --retry-failed`
    * `harness run studies/darkening_diagnosis.yaml --arm baseline --arm ema` (a subset of the arms)
    * `harness run studies/timestep_ablation.yaml --storage postgresql://me@db/optuna --no-work` (then start workers)
    """
    check_device(device)
    if no_work and not storage:
        fail_input(ValueError("--no-work needs --storage: it enqueues the runs there for `harness worker`"))
    study, specs = load(study_path, set_options)
    chosen = _chosen_arms(study_path, specs, arm)
    if chosen is not None and storage:
        fail_input(ValueError("--arm is for local runs; with --storage every arm is enqueued"))
    if storage and study.adaptive is not None:
        fail_input(study.error(("seeds",), "adaptive seeds run locally for now; with --storage list the seeds"))
    selected = [s for s in specs if chosen is None or s.arm.label in chosen]
    preflight_data(study, selected, embedded=False)
    if study.tune is not None:
        tuned = _tune(study, selected, results, device, storage)
        by_name = {s.name: s for s in tuned}
        specs = [by_name.get(s.name, s) for s in specs]
    if storage:
        _record_sampler_checks(study, specs, results)
        _run_on_storage(
            study,
            specs,
            storage,
            results,
            reports if report else None,
            device,
            retry_failed,
            rerun,
            workers,
            not no_work,
        )
    try:
        _run_locally(study, specs, chosen, results, reports if report else None, device, workers, rerun, retry_failed)
    except OSError as error:  # results/ read-only, a full disk: one line naming the file, exit 2
        from ddpm_engine.files import write_error_message

        fail_input(ValueError(write_error_message(error)))


def _run_locally(study, specs, chosen, results, reports, device, workers, rerun, retry_failed) -> None:
    """Run the study's pending keys on local slots, then summarise, report and exit with the
    study's state (0 all finished, 1 some failed, 130 stopped). With adaptive seeds, rounds
    of runs alternate with looks at the hypotheses (harness.sequential) until they stop."""
    wanted = None if study.adaptive is None else {s.arm.label: study.seed_list[: study.adaptive.start] for s in specs}
    ran_here: set[str] = set()  # --rerun reruns each key once, not once per round
    write_manifest(results, study_manifest(study, specs))
    while True:
        planned = specs if wanted is None else [s for s in specs if s.seed in wanted.get(s.arm.label, ())]
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
        following = _next_seeds(study, specs, results, wanted)
        if following == wanted:
            break
        wanted = following
    final = ledger_of(results, study)
    _print_summary(planned, final)
    if reports is not None:
        _build_report(study.study, results, reports)
    if stopped:
        console.print("[yellow]stopped: run the same command again to resume[/]")
        raise typer.Exit(130)
    if any(final.state(s.key) is RunState.FAILED for s in planned):
        raise typer.Exit(1)


def _run_round(study, specs, chosen, results, device, workers, rerun, retry_failed, ran_here: set[str]):
    """Run the keys of ``specs`` not yet finished (all of them once with --rerun); return their
    outcomes and the specs whose training another study's process holds (to wait for). The
    sampler check is recorded after them."""
    from .launch.slots import LocalScheduler, slot_devices

    done_in_mlflow, lost_in_mlflow = _check_tracking_store(study)
    done_in_mlflow -= _repair(study, specs, results, measure=True)
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
        from .runs.reuse import finished_elsewhere, sound_sources

        reusable = {} if rerun else finished_elsewhere(results, study.study, [s.key for s in todo])
        reusable = sound_sources(results, reusable, todo, _client, console.print)
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
        _record_sampler_checks(study, specs, results)
    finally:
        claims.release()
    return outcomes, waiting


def _client():
    from .store.tracking import make_client  # only when a table is damaged: MLflow loads while the slots start

    return make_client()


def _repair(study: Study, specs: list[RunSpec], results: Path, measure: bool) -> set[str]:
    """Damaged tables of finished keys restored from MLflow, else measured again (harness.repair)."""
    from .runs.repair import repair_study

    return repair_study(results, study.study, specs, _client, console.print, measure=measure)


def _measured_only(study: Study, specs: list[RunSpec], ledger, reusable: dict, results: Path) -> list[RunSpec]:
    """Pending keys whose training is on disk here or in another study, and finished keys of
    an older MEASURE_VERSION with a checkpoint: what `harness run` measures without training
    (harness.checkpoints)."""
    from .runs.checkpoints import has_checkpoint, trained_elsewhere, untrained

    pending = [s for s in specs if not ledger.is_finished(s.key) and s.key not in reusable]
    outdated = ledger.outdated(specs)
    candidates = pending + outdated
    elsewhere = trained_elsewhere(results, study.study, candidates)
    found = [
        s for s in candidates if (s in outdated and untrained(s)) or has_checkpoint(results, s) or s.key in elsewhere
    ]
    # arms sharing a training with a run to train here are measured from it too
    training = {s.train_key for s in pending if s not in found}
    firsts: set[str] = set()
    for spec in pending:
        if spec in found or spec.train_key not in training:
            continue
        if spec.train_key in firsts:
            found.append(spec)
        firsts.add(spec.train_key)
    return found


def _outdated(study: Study, outdated: list[RunSpec], results: Path, ran_here: set[str]) -> list[RunSpec]:
    """Finished keys measured under an older MEASURE_VERSION whose training is on disk (here or
    in another study): measured again from it, not trained. Those without one are kept as
    they are and named: retraining them is --rerun's decision, not a side effect."""
    from ddpm_engine.metrics import MEASURE_VERSION

    from .runs.checkpoints import has_checkpoint, trained_elsewhere, untrained

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
    """Trainings finished in other studies copied in (harness.checkpoints): the runs that use
    them are measured, not trained again."""
    from .runs.checkpoints import copy_checkpoint, trained_elsewhere

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
    """Finished runs of other studies with the same run key, made this study's (harness.reuse).
    An MLflow store that fails meanwhile stops the started slots and is one line, exit 2: an
    adoption cut short leaves its key pending, adopted again next time."""
    from .runs.reuse import adopt
    from .store.mlflow_store import StoreFailure
    from .store.tracking import git_commit

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


def _next_seeds(study: Study, specs: list[RunSpec], results: Path, wanted: dict[str, list[int]]):
    """Look at the hypotheses on the finished runs; the seeds each arm needs next, printed."""
    from .report.page import judge_hypotheses
    from .report.results import StudyResults
    from .study.sequential import seeds_wanted

    data = StudyResults.load(results, study.study)
    baseline, _ = data.baseline()
    judged = judge_hypotheses(data, baseline)
    finished = data.finished()
    done = {arm: finished.loc[finished["arm"] == arm, "seed"].tolist() for arm in wanted}
    following = {
        arm: seeds
        for arm, seeds in seeds_wanted(judged, study.hypotheses, done, baseline, study.adaptive).items()
        if arm in wanted
    }
    undecided = judged[judged["verdict"] == "inconclusive"] if not judged.empty else judged
    grown = {arm: len(seeds) for arm, seeds in following.items() if len(seeds) > len(wanted.get(arm, []))}
    if grown:
        console.print(
            f"adaptive seeds: {len(undecided)} hypothesis row(s) undecided; "
            + ", ".join(f"{escape(arm)} -> {n} seeds" for arm, n in grown.items())
        )
    else:
        why = (
            "every hypothesis is decided"
            if undecided.empty
            else f"{len(undecided)} row(s) undecided at the seed budget"
        )
        per_arm = ", ".join(f"{escape(arm)} {len(done[arm])}" for arm in wanted)
        console.print(f"adaptive seeds: stopped ({why}); seeds per arm: {per_arm}")
    return {arm: following.get(arm, seeds) for arm, seeds in wanted.items()}


def _claim(study: Study, results: Path, todo: list[RunSpec], rerun: bool):
    """Claim the trainings this process will run (harness.claims); those another process holds
    are left to it, named, and returned with their holders (a holder of another study is
    waited for, then adopted from). A key finished by another process since the ledger was
    read is dropped."""
    from .runs.claims import KeyClaims, remove_stale_temps

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
    from .runs.claims import wait_until_free

    try:
        return wait_until_free(results, specs, lambda text: console.print(escape(text), highlight=False))
    except KeyboardInterrupt:
        return False


def _record_sampler_checks(study: Study, specs: list[RunSpec], results: Path) -> None:
    """results/<study>/sampler_check.parquet (a fraction of a second per combination)."""
    from .runs.sampler_checks import sampler_check_table, write_sampler_checks

    write_sampler_checks(results, study.study, sampler_check_table(specs))


def _check_tracking_store(study: Study) -> tuple[set[str], dict[str, Path]]:
    """Before any training: a half-made SQLite store repaired or replaced (harness.store),
    said in one message, and pointed at the artifacts of a moved project folder; then the run
    keys of the study the store has finished with its artifacts at hand, and those whose
    artifact folder is gone (with the folder)."""
    from .store.mlflow_store import check_store, finished_keys, probe_store, tracking_uri, unreachable_artifacts

    uri = tracking_uri()
    try:
        probe_store(uri)
        found = check_store(uri)
    except ValueError as error:
        fail_input(error)
    if found.message:
        console.print(f"[yellow]{escape(found.message)}[/]")
    _relocate_artifacts(uri)
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


def _relocate_artifacts(uri: str) -> None:
    """A moved project folder: the store pointed at its artifacts where they are now, said."""
    from .store.mlflow_store import ARTIFACTS_FOLDER, relocate_artifacts

    for message in relocate_artifacts(uri, Path.cwd() / ARTIFACTS_FOLDER):
        console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)  # paths unbroken


def _reconcile(client, experiment_id, specs, results, claims, todo, scheduler) -> None:
    """MLflow and results/ mended from each other for the keys not run now (harness.reconcile).
    A write that fails stops the started slots (and exits 2); any other failure is said and
    the study goes on: the runs are recorded either way."""
    from .runs.reconcile import reconcile
    from .store.mlflow_store import StoreFailure

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
    from .store.mlflow_store import GuardedClient, StoreFailure
    from .store.tracking import RunTracker, ensure_experiment, git_commit, make_client, tracking_uri

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
    into MLflow what it lacks (harness.reconcile). The runs' states, then one line, exit 2."""
    _print_summary(specs, ledger_of(results, study))
    finished = sum(o.state is RunState.FINISHED for o in outcomes)
    stopped = sum(o.state in (RunState.INTERRUPTED, RunState.PENDING) for o in outcomes)
    fail_input(
        ValueError(
            f"{failure}, while runs were training: {stopped} run(s) stopped at their checkpoints and resume "
            f"at the next `harness run`; {finished} finished run(s) are kept in {results / study.study} and "
            "written to MLflow from there once the store works"
        )
    )


def _warn_few_seeds(n: int) -> None:
    """What an interval costs at this seed count: the Student-t critical value multiplies the
    standard error. Quoted from a table (checked against scipy in tests/test_stats.py) because
    importing scipy would cost `plan` 1.6 s."""
    if n < 2:
        console.print("[yellow]1 seed: no confidence interval at all; every hypothesis stays inconclusive[/]")
        return
    console.print(
        f"[yellow]{n} seeds: a 95% interval is ±{T_975[n]:.1f} standard errors (±{T_975[3]:.1f} at 3 seeds, "
        f"±{T_975[5]:.1f} at 5); most effects will be inconclusive[/]"
    )


def _print_sampler_checks(frame) -> None:
    table = Table(
        title="sampler check: the training data's Gaussian denoiser run through each sampler in closed form, "
        "against q(x_t) (no trained model; mean gaps over pixels)",
        title_justify="left",
    )
    from ddpm_engine.sampler_check import TABLE_COLUMNS

    columns = ["arms", *TABLE_COLUMNS]
    for column in columns:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in frame.to_dict("records"):
        table.add_row(
            *[
                f"{row[c]:.4f}" if isinstance(row[c], float) else ("–" if row[c] is None else str(row[c]))
                for c in columns
            ]
        )
    console.print(table)


def _chosen_arms(study_path: Path, specs: list[RunSpec], arms: list[str] | None) -> set[str] | None:
    """The arm labels given with --arm, checked against the study's expansion."""
    if not arms:
        return None
    labels = list(dict.fromkeys(s.arm.label for s in specs))
    for label in arms:
        if label not in labels:
            close = difflib.get_close_matches(label, labels, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; its arms are {', '.join(labels)}"
            fail_input(ValueError(f"--arm {label!r}: {study_path} has no such arm{hint}"))
    return set(arms)


def _tune(study: Study, specs: list[RunSpec], results: Path, device: str, storage: str | None) -> list[RunSpec]:
    """Tune each arm (resuming earlier trials) and return the specs with the best values."""
    import optuna

    from .runs.tuning import tune_study
    from .store.tracking import ensure_experiment, make_client

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage:
        from .launch.optuna_queue import db_url

        storage = db_url(storage)
    client = make_client()
    experiment_id = ensure_experiment(client, study.study, study.question)
    stop = {"requested": False}

    def on_trial(arm: str, number: int, values: dict, value, state: str) -> None:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        result = f"{study.tune.metric}={value:.4g}" if value is not None else state
        console.print(f"tune {arm} trial {number}: {shown} -> {result}", markup=False)

    console.print(
        f"[bold]{study.study}[/]: tuning {', '.join(study.tune.space)} per arm "
        f"({study.tune.trials} trials, {study.tune.resolved_direction} {study.tune.metric})"
    )
    try:
        return tune_study(
            study,
            specs,
            results=results,
            client=client,
            experiment_id=experiment_id,
            storage=storage,
            device=device,
            should_stop=lambda: stop["requested"],
            on_trial=on_trial,
        )
    except KeyboardInterrupt:
        console.print("[yellow]stopped while tuning: run the same command again to resume the search[/]")
        raise typer.Exit(130) from None


def _run_on_storage(study, specs, storage, results, reports, device, retry_failed, rerun, workers, work) -> None:
    from .launch.optuna_queue import DistributedError, run_on_storage

    if rerun:
        fail_input(ValueError("--rerun is not supported with --storage (use --retry-failed, or a new study name)"))
    if workers is not None and workers > 1:
        fail_input(ValueError("--workers is for local runs; with --storage start more `harness worker` processes"))
    try:
        code = run_on_storage(
            study,
            specs,
            storage,
            results=results,
            reports=reports,
            device=device,
            retry_failed=retry_failed,
            work=work,
            console=console,
        )
    except DistributedError as error:
        fail_input(error)
    raise typer.Exit(code)


@app.command()
def worker(
    study_path: Path = typer.Argument(..., help="The study YAML file (or just its name).", show_default=False),
    storage: str = typer.Option(
        ..., "--storage", help="The Optuna storage URL the study was enqueued in.", show_default=False
    ),
    device: str = typer.Option("auto", help="auto (CUDA if visible, else CPU), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: torch's choice, all cores)."
    ),
    results: Path = RESULTS_OPT,
    heartbeat_interval: Optional[int] = typer.Option(
        None,
        "--heartbeat-interval",
        min=1,
        envvar="DDPM_ABLATE_HEARTBEAT_INTERVAL",
        help="Seconds between heartbeats of the running trial [default: 10].",
    ),
    grace_period: Optional[int] = typer.Option(
        None,
        "--grace-period",
        min=1,
        envvar="DDPM_ABLATE_GRACE_PERIOD",
        help="Seconds without a heartbeat before a run counts as dead and is re-queued [default: 30].",
    ),
    max_retry: Optional[int] = typer.Option(
        None,
        "--max-retry",
        min=0,
        envvar="DDPM_ABLATE_MAX_RETRY",
        help="Times a dead worker's run is re-queued [default: 3].",
    ),
    wait: bool = typer.Option(
        True,
        help="When the queue is empty, wait while other workers' runs are running, to take over a dead worker's run; --no-wait exits at once.",
    ),
):
    """Claim waiting runs of a study from the shared Optuna storage and run them here, until none remain.

    Tracks to MLFLOW_TRACKING_URI (a shared `mlflow server`). Enqueue first with
    `harness run STUDY --storage URL --no-work`.

    Examples:

    * `harness worker studies/timestep_ablation.yaml --storage postgresql://me@db-host/optuna`
    * `harness worker timestep_ablation --storage postgresql://me@db-host/optuna --device cuda:1`
    * `harness worker studies/timestep_ablation.yaml --storage $OPTUNA_URL --threads 4 --no-wait`
    """
    from .launch.optuna_queue import (
        DistributedError,
        QueueSettings,
        load_queue,
        open_storage,
        resolve_study_name,
        work_on_storage,
    )

    check_device(device)
    try:
        name = resolve_study_name(study_path)
        settings = QueueSettings.from_env(heartbeat_interval, grace_period, max_retry)
        store = open_storage(storage, settings)
        queue = load_queue(store, name)
    except (DistributedError, StudyError) as error:
        fail_input(error)
    raise typer.Exit(
        work_on_storage(
            queue, store, results=results, device=device, settings=settings, wait=wait, console=console, threads=threads
        )
    )


def _run_with_progress(scheduler, todo: list[RunSpec], make_tracker):
    """Run the scheduler with progress: rich bars on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        from .runs.progress import PlainProgress

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
                from .runs.progress import STORE_FAILED

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


def _print_summary(specs: list[RunSpec], ledger: Ledger) -> None:
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


def _build_report(study: str, results: Path, reports: Path) -> None:
    from .report.page import ReportError, build_report

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


@app.command()
def status(
    study_path: Path = STUDY_ARG,
    set_options: Optional[list[str]] = SET_OPT,
    results: Path = RESULTS_OPT,
    storage: Optional[str] = STORAGE_OPT,
):
    """Show each run of a study: pending, running, finished or failed (with the reason).

    With `--storage`: each run waiting, running (on which host), done or failed, across all workers.

    Examples: `harness status studies/timestep_ablation.yaml`,
    `harness status studies/timestep_ablation.yaml --storage postgresql://me@db-host/optuna`
    """
    study, specs = load(study_path, set_options)
    if storage:
        from .launch.optuna_queue import DistributedError, load_queue, open_storage, print_status, storage_manifest

        try:
            store = open_storage(storage)
            queue = load_queue(store, study.study)
        except DistributedError as error:
            fail_input(error)
        print_status(console, store, queue, storage_manifest(queue) or study_manifest(study, specs))
        return
    _print_summary(specs, ledger_of(results, study))


@app.command()
def report(
    study_path: Path = STUDY_ARG,
    results: Path = RESULTS_OPT,
    reports: Path = REPORTS_OPT,
    from_mlflow: bool = typer.Option(
        False,
        "--from-mlflow",
        help="First pull the runs' Parquet tables and samples from MLFLOW_TRACKING_URI into --results (on a machine that ran nothing).",
    ),
    storage: Optional[str] = typer.Option(
        None,
        "--storage",
        help="Optuna storage of a distributed study: implies --from-mlflow and takes the design (with its --set overrides) from the storage.",
    ),
):
    """Build reports/<study>/index.html from the study's Parquet tables.

    Examples: `harness report studies/timestep_ablation.yaml`,
    `MLFLOW_TRACKING_URI=http://mlflow-host:5000 harness report studies/timestep_ablation.yaml --from-mlflow`
    """
    study, specs = load(study_path, None)
    if from_mlflow or storage:
        from .launch.optuna_queue import DistributedError, load_queue, open_storage, pull_from_mlflow, storage_manifest
        from .store.tracking import make_client

        try:
            manifest = storage_manifest(load_queue(open_storage(storage), study.study)) if storage else None
            pull_from_mlflow(
                make_client(),
                study.study,
                results,
                manifest or study_manifest(study, specs),
                {s.key: s.config_json for s in specs},
                log=console.print,
            )
        except DistributedError as error:
            fail_input(error)
    from .store.mlflow_store import tracking_uri

    _relocate_artifacts(tracking_uri())
    _repair(study, specs, results, measure=False)
    _build_report(study.study, results, reports)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
