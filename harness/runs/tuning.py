"""Tuned ablations: each arm gets its own Optuna search before its seed replicates.

A learning rate tuned for the baseline alone is biased against the other arms; searching
per arm removes that bias. Trials use a shortened step budget, the TPE sampler and median
pruning on the periodic probe loss (held-out L_simple). The search of each arm lives in an
Optuna study in ``results/<study>/tuning.db`` (or the shared --storage), so an interrupted
tuning resumes with the trials it already has. Every trial is an MLflow run nested under
the arm's tuning run; the best values go into the arm's resolved config (and so into its
run keys), and into the ``tuning`` Parquet table for the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from ddpm_engine.config import ExperimentConfig

from ..store.states import Outcome, RunState
from ..store.tables import write_table
from ..store.tracking import log_dataset_input
from ..study.plan import Arm, RunSpec, run_key
from ..study.spec import Distribution, Study, Tune, apply_overrides
from .lifecycle import execute


def suggest(trial: optuna.Trial, key: str, distribution: Distribution) -> Any:
    kind = distribution.kind
    if kind == "loguniform":
        return trial.suggest_float(key, *distribution.loguniform, log=True)
    if kind == "uniform":
        return trial.suggest_float(key, *distribution.uniform)
    if kind == "integer":
        return trial.suggest_int(key, *distribution.integer)
    return trial.suggest_categorical(key, distribution.choice)


class TrialRecorder:
    """Recorder of one trial: metrics to its nested MLflow run, probe losses to Optuna."""

    def __init__(self, client: MlflowClient, run_id: str, trial: optuna.Trial):
        self.client, self.run_id, self.trial = client, run_id, trial
        self.pruned = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if "heldout_loss" in values and math.isfinite(values["heldout_loss"]):
            self.trial.report(values["heldout_loss"], step)
            self.pruned = self.pruned or self.trial.should_prune()

    def table(self, name: str, frame: pd.DataFrame) -> None:
        """Trials keep no tables (they are searched, not reported run by run), only their
        training split as the MLflow run's dataset input."""
        if name == "dataset":
            log_dataset_input(self.client, self.run_id, frame)

    def image(self, name: str, pixels) -> None:
        """Trials keep no sample grids."""


def tuning_storage(results: Path, study: Study, storage: str | None) -> str:
    if storage:
        return storage
    path = Path(results) / study.study / "tuning.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def arm_search_name(study: Study, arm: Arm, tune: Tune) -> str:
    """The Optuna study of one arm; a different search space or budget is a new search."""
    signature = json.dumps(
        {"arm": arm.overrides, "base": study.base, "tune": tune.model_dump(mode="json")}, sort_keys=True
    )
    return f"{study.study}.tune.{arm.label}.{hashlib.sha256(signature.encode()).hexdigest()[:8]}"


def trial_config(study: Study, arm: Arm, tune: Tune, values: dict[str, Any]) -> ExperimentConfig:
    overrides = {**arm.overrides, **values, "train.seed": tune.seed}
    if tune.steps is not None:
        overrides["train.steps"] = tune.steps
        overrides["train.budget_by"] = "steps"
    return ExperimentConfig.model_validate(apply_overrides(study.base, overrides))


def tune_arm(
    study: Study,
    arm: Arm,
    *,
    client: MlflowClient,
    experiment_id: str,
    storage: str,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    on_trial: Callable[[str, int, dict, float | None, str], None] | None = None,
) -> dict[str, Any]:
    """Run the arm's remaining trials and return its best values."""
    tune = study.tune
    name = arm_search_name(study, arm, tune)
    search = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction=tune.resolved_direction,
        sampler=optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=min(4, tune.trials)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    parent_id = _tuning_parent_run(client, experiment_id, study, arm, name)
    # A trial left RUNNING by a killed process will never report: fail it and go on.
    for stale in search.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        search.tell(stale.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    done = [
        t
        for t in search.get_trials(deepcopy=False)
        if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL
    ]
    for _ in range(max(0, tune.trials - len(done))):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        _run_trial(
            search,
            study,
            arm,
            parent_id,
            client=client,
            experiment_id=experiment_id,
            device=device,
            should_stop=should_stop,
            on_trial=on_trial,
        )
    complete = [t for t in search.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not complete:
        raise RuntimeError(f"tuning of arm {arm.label!r} produced no complete trial (all pruned or failed)")
    best = search.best_trial
    client.log_batch(
        parent_id,
        params=[Param(f"best.{k}", str(v)) for k, v in best.params.items()],
        metrics=[Metric(f"best_{tune.metric}", float(best.value), int(time.time() * 1000), 0)],
    )
    client.set_terminated(parent_id, status="FINISHED")
    return dict(best.params)


def _run_trial(
    search, study: Study, arm: Arm, parent_id: str, *, client, experiment_id, device, should_stop, on_trial
) -> None:
    """Ask Optuna for one trial, run it as a nested MLflow run and tell Optuna how it ended."""
    tune, name = study.tune, search.study_name
    trial = search.ask()
    values = {key: suggest(trial, key, dist) for key, dist in tune.space.items()}
    config = trial_config(study, arm, tune, values)
    run = client.create_run(
        experiment_id,
        run_name=f"tune-{arm.label}-t{trial.number}",
        tags={
            "mlflow.parentRunId": parent_id,
            "study": study.study,
            "arm": arm.label,
            "tune_trial": str(trial.number),
            "optuna_study": name,
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
    recorder = TrialRecorder(client, run.info.run_id, trial)

    def stop_trial(recorder: TrialRecorder = recorder) -> bool:  # pruned by Optuna, or stopped by the user
        return recorder.pruned or (should_stop is not None and should_stop())

    outcome = execute(config, recorder, device=device, should_stop=stop_trial)
    state, value = _trial_state(outcome, recorder.pruned, tune)
    if state is None:  # the user stopped the search: this trial is lost, the rest resumes
        search.tell(trial, state=optuna.trial.TrialState.FAIL)
        client.set_terminated(run.info.run_id, status="KILLED")
        raise KeyboardInterrupt
    complete = state == optuna.trial.TrialState.COMPLETE
    search.tell(trial, value if complete else None, state=state)
    if state == optuna.trial.TrialState.PRUNED:
        client.set_tag(run.info.run_id, "pruned", "true")
    if outcome.state is RunState.FAILED:  # a diverging learning rate is an answer, not a crash
        client.set_tag(run.info.run_id, "error", outcome.reason[:5000])
    client.set_terminated(run.info.run_id, status="FAILED" if outcome.state is RunState.FAILED else "FINISHED")
    if on_trial:
        on_trial(
            arm.label,
            trial.number,
            values,
            value if complete else None,
            {"FAIL": "failed"}.get(state.name, state.name.lower()),
        )


def _trial_state(outcome: Outcome, pruned: bool, tune: Tune) -> tuple[optuna.trial.TrialState | None, float]:
    """A run's outcome as an Optuna trial state and value; None when the user stopped it.
    The value is the metric's objective: |gap| for a signed gap, so tuning drives it to zero."""
    TrialState = optuna.trial.TrialState
    if outcome.state is RunState.INTERRUPTED:
        return (TrialState.PRUNED, math.nan) if pruned else (None, math.nan)
    if outcome.state is RunState.FAILED:
        return TrialState.FAIL, math.nan
    value = tune.objective(outcome.summary)
    return (TrialState.COMPLETE, value) if math.isfinite(value) else (TrialState.FAIL, value)


def _tuning_parent_run(client: MlflowClient, experiment_id: str, study: Study, arm: Arm, name: str) -> str:
    found = client.search_runs([experiment_id], f"tags.optuna_study = '{name}' and tags.tune_parent = 'true'")
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"tune-{arm.label}",
        tags={"study": study.study, "arm": arm.label, "tune_parent": "true", "optuna_study": name},
    )
    return run.info.run_id


def tuning_table(study: Study, arm: Arm, storage: str) -> pd.DataFrame:
    search = optuna.load_study(study_name=arm_search_name(study, arm, study.tune), storage=storage)
    best = search.best_trial.number if any(t.state == optuna.trial.TrialState.COMPLETE for t in search.trials) else -1
    rows = [
        {
            "arm": arm.label,
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "metric": study.tune.metric,
            "params_json": json.dumps(t.params, sort_keys=True),
            "best": t.number == best,
            **{f"param.{k}": v for k, v in t.params.items()},
        }
        for t in search.trials
    ]
    return pd.DataFrame(rows)


def apply_tuning(study: Study, specs: list[RunSpec], best: dict[str, dict[str, Any]]) -> list[RunSpec]:
    """The study's specs with each arm's tuned values in its config (and so its run key)."""
    tuned = []
    for spec in specs:
        values = best[spec.arm.label]
        arm = Arm(label=spec.arm.label, levels=spec.arm.levels, overrides={**spec.arm.overrides, **values})
        config = ExperimentConfig.model_validate(
            apply_overrides(study.base, {**arm.overrides, "train.seed": spec.seed})
        )
        tuned.append(RunSpec(study=spec.study, arm=arm, seed=spec.seed, config=config, key=run_key(config, spec.seed)))
    return tuned


def tune_study(
    study: Study,
    specs: list[RunSpec],
    *,
    results: Path,
    client: MlflowClient,
    experiment_id: str,
    storage: str | None = None,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    on_trial=None,
) -> list[RunSpec]:
    """Tune every arm (resuming earlier trials), record the `tuning` table, and return the
    specs with tuned configs."""
    url = tuning_storage(results, study, storage)
    arms = {s.arm.label: s.arm for s in specs}
    best = {}
    for label, arm in arms.items():
        best[label] = tune_arm(
            study,
            arm,
            client=client,
            experiment_id=experiment_id,
            storage=url,
            device=device,
            should_stop=should_stop,
            on_trial=on_trial,
        )
        key = hashlib.sha256(arm_search_name(study, arm, study.tune).encode()).hexdigest()[:12]
        write_table(results, study.study, "tuning", key, tuning_table(study, arm, url))
    return apply_tuning(study, specs, best)
