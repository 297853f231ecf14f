"""Adaptive seeds, whichever launcher runs them: rounds of runs alternate with looks at the
hypotheses (harness.study.sequential) until every hypothesis is decided or the seed budget is
spent. Locally the rounds run on slots (harness.launch.local); on a shared queue the launcher's
process coordinates them (harness.launch.queue_rounds).
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from ..study.plan import RunSpec
from ..study.spec import Study
from ..terminal import console


def first_round(study: Study, specs: list[RunSpec]) -> dict[str, list[int]]:
    """The seeds every arm starts with."""
    return {s.arm.label: study.seed_list[: study.adaptive.start] for s in specs}


def planned_specs(specs: list[RunSpec], wanted: dict[str, list[int]]) -> list[RunSpec]:
    """The specs of the seeds each arm is wanted at."""
    return [s for s in specs if s.seed in wanted.get(s.arm.label, ())]


def next_seeds(study: Study, specs: list[RunSpec], results: Path, wanted: dict[str, list[int]]):
    """Look at the hypotheses on the finished runs; the seeds each arm needs next, printed."""
    from ..report.page import judge_hypotheses
    from ..report.results import StudyResults
    from ..study.sequential import seeds_wanted

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
