"""What each `harness` command does, once its arguments are parsed (harness.cli): plan, run
(through a launcher, harness.launch), worker, status and report."""

from __future__ import annotations

import difflib
from collections import Counter
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ddpm_engine.metrics import REFERENCE_NAMES

from .launch.base import Launcher
from .report.summary import ledger_of, print_summary, write_report
from .study.plan import RunSpec, changed_keys, expand, study_manifest
from .study.spec import Study, StudyError, load_study
from .terminal import console, fail_input

PLAN_ARMS_SHOWN = 40
T_975 = {2: 12.706, 3: 4.303, 5: 2.776}  # two-sided 95% Student-t critical value for n seeds (df = n - 1)


def plan(
    study_path: Path,
    set_options: list[str] | None,
    device: str,
    results: Path,
    measure: bool,
    check: bool,
    all_arms: bool,
) -> None:
    """Print the expansion (arms x seeds) with parameters, estimated time and what is done,
    reused or measured only; runs nothing."""
    study, specs = load(study_path, set_options)
    # the digits need loading only to time steps; other data are always checked here
    data = preflight_data(study, specs, embedded=measure)
    dev = None
    if measure:  # torch loads only when steps are timed (about 2 s)
        from ddpm_engine.device import resolve_device

        dev = resolve_device(device)
    ledger = ledger_of(results, study)
    from .runs.reuse import finished_elsewhere

    reusable = finished_elsewhere(results, study.study, [s.key for s in specs if not ledger.is_finished(s.key)])
    measured_only = _measured_only(study, specs, ledger, reusable, results)
    by_arm: dict[str, list[RunSpec]] = {}
    for spec in specs:
        by_arm.setdefault(spec.arm.label, []).append(spec)
    total = _print_arms(study, by_arm, data, dev, ledger, reusable, measured_only, all_arms)
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
    _print_plan_summary(study, specs, len(by_arm), ledger, reusable, measured_only, total, dev)


def _print_arms(study, by_arm, data, dev, ledger, reusable: dict, measured_only: list, all_arms: bool) -> float:
    """The table of arms (the first PLAN_ARMS_SHOWN unless ``all_arms``); returns the estimated
    seconds to train what is not done, over every arm (``dev`` None: not timed, 0)."""
    if dev is not None:
        from .study.cost import estimate, format_seconds
    table = Table(title=f"{study.study}: {study.question}", title_justify="left")
    for column in (
        "arm",
        "seeds",
        "changed keys",
        "params",
        f"est. {'CPU' if dev is None else dev.type.upper()} time / run",
        "done / reused / to train",
    ):
        table.add_column(column, overflow="fold")
    cache: dict = {}
    total = 0.0
    for index, (arm, arm_specs) in enumerate(by_arm.items()):
        first = arm_specs[0]
        params, seconds = "", ""
        if dev is not None:
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
    return total


def _print_plan_summary(
    study, specs, arms: int, ledger, reusable: dict, measured_only: list, total: float, dev
) -> None:
    """The line of counts and the estimated time, then what the design's choices cost."""
    adaptive = study.adaptive
    if adaptive is None:
        summary = f"{len(specs)} runs ({arms} arms x {len(study.seed_list)} seeds)"
    else:
        summary = (
            f"{arms * adaptive.start} to {len(specs)} runs ({arms} arms x {adaptive.start} to "
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
    if dev is not None:
        from .study.cost import format_seconds

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


def run(
    study_path: Path,
    set_options: list[str] | None,
    arms: list[str] | None,
    launcher: Launcher,
    *,
    results: Path,
    device: str,
    storage: str | None,
) -> int:
    """Load the study, check its arms and data, tune it if it says so, then hand its run specs
    to ``launcher``; the launcher's exit code."""
    study, specs = load(study_path, set_options)
    chosen = _chosen_arms(study_path, specs, arms)
    try:
        launcher.check(study, chosen)
    except (ValueError, StudyError) as error:
        fail_input(error)
    selected = [s for s in specs if chosen is None or s.arm.label in chosen]
    preflight_data(study, selected, embedded=False)
    if study.tune is not None:
        tuned = _tune(study, selected, results, device, storage)
        by_name = {s.name: s for s in tuned}
        specs = [by_name.get(s.name, s) for s in specs]
    return launcher.launch(study, specs)


def worker(
    study_path: Path,
    storage: str,
    device: str,
    threads: int | None,
    results: Path,
    heartbeat_interval: int | None,
    grace_period: int | None,
    max_retry: int | None,
    wait: bool,
) -> int:
    """Work on a study's queue in the Optuna storage until no run remains; the exit code."""
    from .launch.queue_worker import work_on_storage
    from .launch.trial_queue import DistributedError, QueueSettings, load_queue, open_storage, resolve_study_name

    try:
        name = resolve_study_name(study_path)
        settings = QueueSettings.from_env(heartbeat_interval, grace_period, max_retry)
        store = open_storage(storage, settings)
        queue = load_queue(store, name)
    except (DistributedError, StudyError) as error:
        fail_input(error)
    return work_on_storage(
        queue, store, results=results, device=device, settings=settings, wait=wait, console=console, threads=threads
    )


def status(study_path: Path, set_options: list[str] | None, results: Path, storage: str | None) -> None:
    """Print each run of a study and its state; with ``storage``, across all workers."""
    study, specs = load(study_path, set_options)
    if storage:
        from .launch.trial_queue import DistributedError, load_queue, open_storage, print_status, storage_manifest

        try:
            store = open_storage(storage)
            queue = load_queue(store, study.study)
        except DistributedError as error:
            fail_input(error)
        print_status(console, store, queue, storage_manifest(queue) or study_manifest(study, specs))
        return
    print_summary(specs, ledger_of(results, study))


def report(study_path: Path, results: Path, reports: Path, from_mlflow: bool, storage: str | None) -> None:
    """Build the study's report from its tables; first pull them from MLflow with
    ``from_mlflow`` (``storage``: with the design the Optuna storage holds)."""
    study, specs = load(study_path, None)
    if from_mlflow or storage:
        from .launch.trial_queue import DistributedError, load_queue, open_storage, pull_from_mlflow, storage_manifest
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
    from .launch.local import relocate_artifacts_saying
    from .runs.repair import open_tracking_client, repair_study
    from .store.mlflow_store import tracking_uri

    relocate_artifacts_saying(tracking_uri())
    repair_study(results, study.study, specs, open_tracking_client, console.print, measure=False)
    write_report(study.study, results, reports)


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


def _measured_only(study: Study, specs: list[RunSpec], ledger, reusable: dict, results: Path) -> list[RunSpec]:
    """Pending keys whose training is on disk here or in another study, and finished keys of
    an older MEASURE_VERSION with a checkpoint: what `harness run` measures without training
    (harness.runs.checkpoints)."""
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
        from .launch.trial_queue import db_url

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
