"""A study's report page: the results layer -> tables, hypotheses and figures -> one static page.

``build_report(study, results_root, reports_root)`` writes ``reports_root/<study>/index.html``
with its figure PNGs and copied sample grids beside it. The page opens from disk with no
network. What counts as a run's result comes from ``harness.report.results``; figures from
``harness.report.figures``; statistics from ``harness.study.stats``; verdicts from ``harness.study.hypotheses``;
HTML from ``templates/report.html.j2``.

The Hypotheses section comes first and answers first: a summary of at most three lines and a
hypothesis x arm matrix of verdicts (``hypothesis_matrix``), then the sentences and the table. Effects
are per-seed PAIRED differences against the baseline with their 95% Student-t CI (df = n - 1);
only an effect whose CI excludes zero gets a verdict other than "no clear effect", and a
metrics-table star goes only to an arm that is clearly best (``stats.clear_best_arms``). Costs
(seconds, throughput) are shown but never starred: timing noise is not an effect.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import jinja2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ddpm_engine.files import atomic_write
from ddpm_engine.metrics import MEASURED_IN, PER_RUN, Metric, measurement_basis, report_columns

from ..store.states import RunState
from ..study import stats
from .figures import FIGURES, arm_palette, fmt, render_figure
from .results import FINISHED, NOT_STARTED, StudyResults, read_table_tolerant

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATUS_ORDER = [
    str(s) for s in (RunState.FINISHED, RunState.RUNNING, RunState.INTERRUPTED, RunState.FAILED, RunState.PENDING)
] + [NOT_STARTED]
CI_STATEMENT = "mean ± half-width of the 95% Student-t CI over n seeds"


def star_direction(metric: Metric) -> str | None:
    """stats' direction of a metric for stars and better/worse words; None for costs and
    descriptions (only "higher" / "lower" is said of them)."""
    if metric.cost or metric.better is None:
        return None
    return stats.HIGHER if metric.better == "higher" else stats.LOWER


def metric_values(data: StudyResults, metric: Metric) -> dict[str, dict[int, float]]:
    """arm -> seed -> value, as compared: |value| where closer to zero is better."""
    return {
        arm: {s: metric.objective(v) for s, v in by_seed.items()} for arm, by_seed in data.metric(metric.name).items()
    }


def fmt_signed(x: float, digits: int = 3) -> str:
    text = fmt(x, digits)
    return text if text == "–" or text.startswith("-") else "+" + text


def arm_status(data: StudyResults, arm: str) -> tuple[list[str], str]:
    """(['2 finished', '1 failed'], css class of the worst status)."""
    counts = Counter(data.runs.loc[data.runs["arm"] == arm, "status"])
    if not counts:
        return ["no runs"], "st-pending"
    order = sorted(counts, key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER))
    parts = [f"{counts[s]} {s}" for s in order]
    if set(counts) == {FINISHED}:
        css = FINISHED
    elif RunState.FAILED in counts:
        css = str(RunState.FAILED)
    else:
        css = next(s for s in order if s != FINISHED)
    return parts, "st-" + css.replace(" ", "-")


def metrics_table(data: StudyResults) -> list[dict]:
    columns = report_columns()
    values = {m.name: metric_values(data, m) for m in columns}
    summaries = {m.name: {arm: stats.mean_ci(values[m.name][arm].values()) for arm in data.arms} for m in columns}
    # ★ only for an arm that is clearly best (paired CI against every other arm excludes zero
    # in its favour): a best mean whose lead lies inside its CI is not a win
    # a metric measured in each run's own objective or noise levels has no best arm across
    # arms that differ in them
    measures = {arm: measured_in(data, arm) for arm in data.arms}
    best = {
        m.name: set() if _mixed(measures, m, data.arms) else stats.clear_best_arms(values[m.name], star_direction(m))
        for m in columns
    }
    rows = []
    for arm in data.arms:
        n_finished = int((data.finished()["arm"] == arm).sum())
        status_text, status_class = arm_status(data, arm)
        cells = []
        for m in columns:
            mean, half, n = summaries[m.name][arm]
            if n_finished == 0:
                cells.append({"nodata": True, "text": "no data"})
                continue
            cells.append(
                {
                    "nodata": False,
                    "text": fmt(mean),
                    "half": fmt(half, 2) if n > 1 else "",
                    "n_note": "not measured" if n == 0 else (f"n={n}" if n == 1 or n != n_finished else ""),
                    "best": arm in best[m.name],
                }
            )
        rows.append(
            {
                "arm": arm,
                "status": status_text,
                "status_class": status_class,
                "n": n_finished,
                "has_data": n_finished > 0,
                "cells": cells,
            }
        )
    return rows


def effects_table(data: StudyResults, baseline: str | None) -> tuple[list[dict], list[dict]]:
    """(a row per arm of paired effects against the baseline, the minimum-detectable-effect
    cells). Every arm x metric cell that is not a cost is one test; their p-values are
    Holm-adjusted together and a cell is starred (and called better / worse) only if it
    survives. Costs are shown and said "higher" / "lower", never starred or tested.

    A log-scale metric (ddpm_engine.metrics) is compared by the per-seed log ratio arm /
    baseline and shown as the ratio (geometric mean of the per-seed ratios) with its CI; an
    estimated metric with no spread is tested by the sign test (stats.p_value). The minimum
    detectable effect is computed at the level Holm's first step needs, alpha / the number of
    tested cells: smaller effects cannot survive the correction with 80% power."""
    if baseline is None:
        return [], []
    from ..study.hypotheses import holm

    columns = report_columns()
    values = {m.name: metric_values(data, m) for m in columns}
    arms = [a for a in data.arms if a != baseline]
    diffs = {
        (a, m.name): (stats.log_ratios if m.scale == "log" else stats.paired_differences)(
            values[m.name][a], values[m.name][baseline]
        )
        for a in arms
        for m in columns
    }
    measures = {arm: measured_in(data, arm) for arm in data.arms}
    incomparable = {
        (a, m.name): differ for a in arms for m in columns if (differ := _differing(measures, m, a, baseline))
    }
    tested = [key for key in diffs if star_direction(PER_RUN[key[1]]) is not None and key not in incomparable]
    adjusted = dict(zip(tested, holm([stats.p_value(diffs[key], exact=PER_RUN[key[1]].exact) for key in tested])))
    rows = []
    for arm in arms:
        cells = [
            _effect_cell(diffs[arm, m.name], m, adjusted.get((arm, m.name)), incomparable.get((arm, m.name), ()))
            for m in columns
        ]
        pairs = max(c["n"] for c in cells)
        for cell in cells:  # a metric with fewer pairs than the row's says so
            cell["n_note"] = f"n={cell['n']}" if 0 < cell["n"] < pairs else ""
        rows.append({"arm": arm, "pairs": pairs, "cells": cells})
    n_seeds = len(data.seeds) or max((len(d) for d in diffs.values()), default=0)
    level = 0.05 / max(1, len(tested))
    mde = []
    for m in columns:
        spreads = [float(np.std(diffs[a, m.name], ddof=1)) for a in arms if len(diffs[a, m.name]) > 1]
        sd = float(np.sqrt(np.mean(np.square(spreads)))) if spreads else math.nan
        smallest = stats.minimum_detectable_effect(sd, n_seeds, alpha=level)
        mde.append({"text": _mde_text(smallest, m.scale == "log"), "cost": star_direction(m) is None})
    return rows, mde


# A ratio beyond this is no effect anyone would look for: the seeds are too few to say more.
MDE_RATIO_SHOWN = 1000.0


def _mde_text(smallest: float, log: bool) -> str:
    """The minimum detectable effect in the metric's own terms: a difference, or for a log
    metric a ratio (× or ÷ it), shown as "> ×1,000" past MDE_RATIO_SHOWN."""
    if not log or not math.isfinite(smallest):
        return fmt(smallest)
    if smallest > math.log(MDE_RATIO_SHOWN):
        return f"> ×{fmt(MDE_RATIO_SHOWN)}"
    return f"×{fmt(math.exp(smallest))}"


def mde_level(tested_cells: int) -> str:
    """The level the minimum detectable effect is computed at, in words for the report."""
    if tested_cells <= 1:
        return "level 0.05"
    return f"level 0.05/{tested_cells} (Holm's first step)"


def measured_in(data: StudyResults, arm: str) -> dict[str, str] | None:
    """What an arm's metrics are measured in besides its model (ddpm_engine.metrics.measurement_basis),
    from a finished run's resolved config; None when no finished run says."""
    finished = data.finished()
    for text in finished.loc[finished["arm"] == arm, "config_json"]:
        if text:
            return measurement_basis(json.loads(text))
    return None


def _differing(measures: dict, metric: Metric, arm: str, baseline: str) -> tuple[str, ...]:
    """The parts of metric.measured_in in which ``arm`` and ``baseline`` differ (an arm with no
    finished run has no pairs to compare anyway)."""
    a, b = measures.get(arm), measures.get(baseline)
    if a is None or b is None:
        return ()
    return tuple(part for part in metric.measured_in if a[part] != b[part])


def _mixed(measures: dict, metric: Metric, arms: list[str]) -> bool:
    """Whether some two arms differ in a part the metric is measured in."""
    known = [m for m in (measures[a] for a in arms) if m is not None]
    return any(len({m[part] for m in known}) > 1 for part in metric.measured_in)


# the effects cell of a metric in the run's own objective, between arms trained on different ones
NOT_COMPARABLE = "not comparable"


def _effect_cell(
    diffs: list[float], metric: Metric, p_adjusted: float | None, incomparable: tuple[str, ...] = ()
) -> dict:
    diff, half, n = stats.mean_ci(diffs)
    direction = star_direction(metric)
    if incomparable:  # shown for what it is, never tested: the two arms' losses are different quantities
        direction, p_adjusted = None, None
    word = NOT_COMPARABLE if incomparable else stats.verdict(diff, half, n, direction)
    survives = p_adjusted is not None and math.isfinite(p_adjusted) and p_adjusted < 0.05
    if direction is not None and word in ("better", "worse") and not survives:
        word = stats.NO_CLEAR_EFFECT  # the interval alone excludes 0, but not after Holm
    starred = direction is not None and survives and word in ("better", "worse")
    log = metric.scale == "log"
    title = ""
    if n > 1:
        if log:  # the log ratio's interval, back on the ratio scale: asymmetric, so no ± shown
            title = f"ratio arm/baseline, 95% CI {fmt(math.exp(diff - half))} to {fmt(math.exp(diff + half))} over {n} pairs"
        else:
            title = f"95% CI {fmt(diff - half)} to {fmt(diff + half)} over {n} pairs"
        if incomparable:
            differ = " and ".join(MEASURED_IN[part] for part in incomparable)
            title += f"; the arm and the baseline have different {differ}, which this metric is measured in: not tested"
        elif p_adjusted is not None:
            title += f"; Holm-adjusted p = {fmt(p_adjusted)}"
        else:  # what the registry says of the metric: a cost, or a description with no better side
            title += "; a cost: not tested" if metric.cost else "; no better direction: not tested"
    if log:
        text = f"×{fmt(math.exp(diff))}" if n else ""
        shown_half = (
            f"{fmt(math.exp(diff - half), 2)}–{fmt(math.exp(diff + half), 2)}" if n > 1 and math.isfinite(half) else ""
        )
    else:
        text = fmt_signed(diff) if n else ""
        shown_half = fmt(half, 2) if n > 1 else ""
    return {
        "text": text,
        "half": shown_half,
        "log": log,
        "n": n,
        "verdict": word,
        "excludes_zero": starred,
        "title": title,
        "class": {"better": "eff-better", "worse": "eff-worse"}.get(word, "eff-sig" if starred else "eff-none"),
    }


def metric_columns() -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for m in report_columns():
        arrow = {"lower": "↓", "higher": "↑", "zero": "→0"}.get(m.better or "", "")
        groups.setdefault(m.group, []).append(
            {"key": m.name, "label": m.label, "arrow": arrow, "definition": m.definition}
        )
    return [{"group": g, "metrics": ms} for g, ms in groups.items()]


# --------------------------------------------------------------------------------------
# Samples, runs, design


def sample_grids(data: StudyResults, out_dir: Path) -> tuple[list[dict], str]:
    for old in out_dir.glob("samples_*.png"):
        old.unlink()
    grids = []
    finished = data.finished()
    for arm in data.arms:
        entry = {"arm": arm, "seed": None, "src": None, "note": ""}
        for seed, key in data.finished_in_seed_order(arm):
            source = data.root / data.study / "samples" / f"{key}.png"
            if source.exists():
                target = out_dir / f"samples_{_safe(key)}.png"
                shutil.copyfile(source, target)
                entry.update(seed=seed, src=target.name)
                break
        if entry["src"] is None:
            entry["note"] = "no sample grid (" + ", ".join(arm_status(data, arm)[0]) + ")"
        grids.append(entry)
    return grids, evaluation_design(finished)


def evaluation_design(finished) -> str:
    """How the finished runs were measured, in one paragraph: the draws of each replicate
    (ddpm_engine.config.replicate_seed), and a warning when arms use different base seeds
    (then the arms of one replicate do not share x_T, and paired effects carry that noise)."""
    bases: dict[str, set] = {"sample": set(), "probe": set()}
    for text in finished["config_json"]:
        try:
            config = json.loads(text)
            bases["sample"].add(config["sample"]["seed"])
            bases["probe"].add(config["eval"]["probe_seed"])
        except (ValueError, KeyError, TypeError):
            pass
    if not bases["sample"]:
        return "No finished run records its evaluation draws."
    text = (
        "Evaluation draws: replicate s (training seed s) samples from its own x_T and sampling noise, "
        f"drawn from (sample.seed = {', '.join(map(str, sorted(bases['sample'])))}, s), and is probed on its own "
        f"noise, drawn from (eval.probe_seed = {', '.join(map(str, sorted(bases['probe'])))}, s). Every arm of a "
        "replicate shares them (common random numbers: paired effects are not draw noise), and each replicate "
        "draws anew, so the intervals over seeds include the evaluation draws' noise."
    )
    if len(bases["sample"]) > 1 or len(bases["probe"]) > 1:
        text += (
            " Warning: arms use different base seeds, so the arms of one replicate do not share x_T or the probe noise."
        )
    return text


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def run_rows(data: StudyResults) -> list[dict]:
    rows = []
    for r in data.runs.itertuples(index=False):
        seconds = float(r.seconds) if r.seconds is not None and not pd.isna(r.seconds) else math.nan
        rows.append(
            {
                "arm": r.arm,
                "seed": int(r.seed),
                "run_key": r.run_key or "–",
                "status": r.status,
                "status_class": "st-" + str(r.status).replace(" ", "-"),
                "mlflow_run_id": r.mlflow_run_id or "–",
                "seconds": fmt(seconds),
                "error": r.error if r.status != FINISHED else "",
            }
        )
    return rows


def design_context(data: StudyResults, baseline: str | None, baseline_how: str) -> dict:
    manifest = data.manifest
    base_levels = manifest.get("baseline") or {}
    axes = [
        {"axis": axis, "levels": [{"name": str(level), "baseline": base_levels.get(axis) == level} for level in levels]}
        for axis, levels in (manifest.get("axes") or {}).items()
    ]
    arms = []
    by_name = {a["arm"]: a for a in manifest.get("arms") or []}
    for arm in data.arms:
        spec = by_name.get(arm, {})
        text, css = arm_status(data, arm)
        arms.append(
            {
                "arm": arm,
                "baseline": arm == baseline,
                "levels": [f"{k}={v}" for k, v in (spec.get("levels") or {}).items()],
                "overrides": [f"{k} = {json.dumps(v)}" for k, v in (spec.get("overrides") or {}).items()],
                "status": text,
                "status_class": css,
            }
        )
    return {
        "name": manifest.get("study"),
        "question": manifest.get("question") or "(no question recorded)",
        "design": manifest.get("design") or "unknown",
        "axes": axes,
        "arms": arms,
        "seeds": data.seeds,
        "baseline": baseline,
        "baseline_how": baseline_how,
    }


# --------------------------------------------------------------------------------------


def tuning_context(data: StudyResults) -> list[dict]:
    """Each arm's search (the `tuning` table): trials, the best value per tuned key."""
    frame = read_table_tolerant(data.root, data.study, "tuning", data.notes)
    if frame.empty:
        return []
    rows = []
    for arm in [a for a in data.arms if a in set(frame["arm"])] + sorted(set(frame["arm"]) - set(data.arms)):
        trials = frame[frame["arm"] == arm]
        best = trials[trials["best"]]
        params = {c[len("param.") :]: best[c].iloc[0] for c in trials.columns if c.startswith("param.") and len(best)}
        states = trials["state"].value_counts().to_dict()
        rows.append(
            {
                "arm": arm,
                "metric": str(trials["metric"].iloc[0]),
                "best_value": fmt(float(best["value"].iloc[0])) if len(best) else "–",
                "best_params": [f"{k} = {fmt(v) if isinstance(v, float) else v}" for k, v in params.items()],
                "trials": ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
            }
        )
    return rows


def looks_of(manifest: dict) -> list[int] | None:
    """The looks of a study with adaptive seeds (study.json), else None."""
    from ..study.spec import AdaptiveSeeds

    adaptive = manifest.get("adaptive")
    return AdaptiveSeeds.model_validate(adaptive).looks if adaptive else None


def judge_hypotheses(data: StudyResults, baseline: str | None) -> pd.DataFrame:
    """The verdicts of the study's hypotheses (recorded in study.json), also written to
    ``results/<study>/hypotheses.parquet``; an empty frame when it declares none."""
    from ..store.tables import write_frame
    from ..study.hypotheses import Hypothesis, evaluate

    declared = {name: Hypothesis.model_validate(h) for name, h in (data.manifest.get("hypotheses") or {}).items()}
    path = data.root / data.study / "hypotheses.parquet"
    if path.is_dir():  # os.replace onto a folder says only "Is a directory", naming the temp file
        raise ReportError(f"{path} is a folder, where the hypotheses' verdicts are written: move it away")
    frame = pd.DataFrame()
    if declared:
        frame = evaluate(declared, data.per_run(), data.arms, baseline, looks=looks_of(data.manifest))
    try:
        if declared:
            write_frame(path, frame)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        # the verdicts are derived from the tables and whole on the page: a read-only results/
        # (an archived study) must not keep its report from being built
        if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
            raise
        if declared:
            data.notes.append(f"{path} was not written ({error.strerror}): the verdicts are only on this page.")
    return frame


def _estimate_text(row: dict) -> str:
    """A row's estimate as ``quantity`` names it: a ratio against the baseline on a log scale, a
    signed difference against it, else the arm's own value."""
    if row["versus"] != "baseline":
        return fmt(row["estimate"])
    if row.get("scale") == "log":
        text = fmt(row["estimate"])
        return text if text == "–" else "×" + text
    return fmt_signed(row["estimate"])


def _ci_text(row: dict) -> str:
    finite = math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
    return f"{fmt(row['ci_low'])} to {fmt(row['ci_high'])}" if finite else "–"


def _matrix_cell(row: dict) -> dict:
    from ..study.hypotheses import NO_RUN

    n = int(row["n"])
    if n == 0 or not math.isfinite(row["estimate"]):
        measured = NO_RUN
    elif math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
        measured = f"{_estimate_text(row)} [{_ci_text(row)}]"
    else:  # one seed, or every seed equal (the sign test decides): no interval to show
        measured = f"{_estimate_text(row)}, n={n}, no interval"
    return {
        "arm": row["arm"],
        "judged": True,
        "verdict": row["verdict"],
        "measured": measured,
        "p_adj": _p(row["p_adjusted"]),
        "title": row["sentence"],
    }


def hypothesis_matrix(judged: pd.DataFrame, arms: Sequence[str]) -> dict:
    """The report's first screen, from the judged rows (``judge_hypotheses``): a grid of one row
    per hypothesis and one column per arm that some hypothesis is judged on, and a summary of
    at most three lines.

    Columns follow ``arms`` (the study's order); an arm judged but no longer in the study (a
    hypothesis naming a removed arm) comes after them, so no judged row is lost. A pair not
    judged (a hypothesis on one arm, or versus the baseline, which is not judged against
    itself) is a cell with ``judged: False``.
    """
    from ..study.hypotheses import INCONCLUSIVE, REFUTED, SUPPORTED, expectation, quantity

    records = judged.to_dict("records")
    judged_arms = {r["arm"] for r in records}
    columns = [a for a in arms if a in judged_arms]
    columns += list(dict.fromkeys(r["arm"] for r in records if r["arm"] not in set(columns)))
    by_pair = {(r["name"], r["arm"]): r for r in records}
    rows = []
    for name in dict.fromkeys(r["name"] for r in records):
        first = next(r for r in records if r["name"] == name)
        cells = [
            _matrix_cell(by_pair[name, arm])
            if (name, arm) in by_pair
            else {"arm": arm, "judged": False, "title": f"{name}: not judged on {arm}"}
            for arm in columns
        ]
        says = first.get("says")
        rows.append(
            {
                "name": name,
                "says": says.strip() if isinstance(says, str) else "",
                "quantity": quantity(first),
                "expected": expectation(first),
                "cells": cells,
            }
        )

    def named(verdict: str) -> list[str]:
        # a hypothesis decided the same way on several arms is named once, with its arms
        arms_of = {}
        for r in records:
            if r["verdict"] == verdict:
                arms_of.setdefault(r["name"], []).append(r["arm"])
        return [f"{name} on {', '.join(sorted(on, key=columns.index))}" for name, on in arms_of.items()]

    counts = Counter(r["verdict"] for r in records)
    summary = [
        {"verdict": v, "label": v.capitalize(), "count": counts[v], "names": named(v)} for v in (SUPPORTED, REFUTED)
    ]
    summary.append({"verdict": INCONCLUSIVE, "label": "Inconclusive", "count": counts[INCONCLUSIVE], "names": []})
    return {"arms": columns, "rows": rows, "summary": summary, "total": len(records)}


def hypotheses_context(data: StudyResults, judged: pd.DataFrame) -> dict:
    if judged.empty:
        return {
            "rows": [],
            "note": "This study states no hypotheses: add a `hypotheses` block to its study file "
            "(see docs/design.md) to have each claim judged here.",
        }

    rows = []
    for row in judged.to_dict("records"):
        metric = PER_RUN.get(row["metric"])
        margin = f"±{fmt(row['value'])}" if row["expect"] == "within" else fmt(row["value"])
        rows.append(
            {
                "name": row["name"],
                "arm": row["arm"],
                "metric": row["metric"],
                "versus": row["versus"],
                "definition": metric.definition if metric else "",
                "expected": f"{row['expect']} {margin}",
                "n": int(row["n"]),
                "estimate": _estimate_text(row),
                "ci": _ci_text(row),
                "p": _p(row["p_value"]),
                "p_adj": _p(row["p_adjusted"]),
                "verdict": row["verdict"],
                "sentence": row["sentence"],
            }
        )
    adaptive = data.manifest.get("adaptive")
    sequential = ""
    if adaptive:
        seeds = data.finished().groupby("arm")["seed"].nunique()
        per_arm = ", ".join(f"{arm} {int(seeds.get(arm, 0))}" for arm in data.arms)
        sequential = (
            f"Adaptive seeds: every arm ran {adaptive['start']}, then arms with an undecided row got "
            f"{adaptive['batch']} more at a time, up to {adaptive['max']} (seeds run: {per_arm}). Each row is judged at "
            "every look it reached against exact group-sequential boundaries (O'Brien-Fleming alpha spending, "
            "Lan-DeMets, from the joint law of the looks' t statistics); its p is the sequential p-value, the "
            "smallest level at which some reached look crosses its boundary, so stopping early cannot inflate "
            'false positives (docs/design.md, "Adaptive seeds").'
        )
    return {
        "rows": rows,
        "note": "",
        "sequential": sequential,
        "matrix": hypothesis_matrix(judged, data.arms),
    }


def _p(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def sampler_check_rows(data: StudyResults) -> list[dict]:
    from ..runs.sampler_checks import read_sampler_checks

    frame = read_sampler_checks(data.root, data.study)
    rows = []
    for row in frame.to_dict("records"):
        shown = {k: (f"{v:.4f}" if isinstance(v, float) and k.endswith("gap") else v) for k, v in row.items()}
        shown.update({k: "–" for k in ("sigma", "steps") if row.get(k) is None or row.get(k) != row.get(k)})
        shown.setdefault("eps_scale", 1.0)  # checks written before sample.eps_scale existed
        rows.append(shown)
    return rows


def budget_statement(data: StudyResults) -> str:
    """How training budgets compare across arms (train.budget_by of the finished runs)."""
    budgets = set()
    for text in data.runs.get("config_json", pd.Series(dtype=str)).dropna():
        if not text:
            continue
        train = json.loads(text).get("train", {})
        kind = train.get("budget_by", "steps")
        amount = {
            "steps": train.get("steps"),
            "images": train.get("budget_images"),
            "seconds": train.get("budget_seconds"),
        }[kind]
        budgets.add((kind, amount))
    if not budgets:
        return "unknown (no run has started)"
    kinds = {k for k, _ in budgets}
    parts = ", ".join(f"{amount} {kind}" for kind, amount in sorted(budgets, key=str))
    if len(kinds) == 1:
        kind = next(iter(kinds))
        held = {
            "steps": "equal optimizer steps",
            "images": "equal images seen",
            "seconds": "equal training wall-clock time",
        }[kind]
        return f"arms are compared at {held} ({parts})"
    return f"arms mix budget kinds ({parts}); compare with care"


class ReportError(ValueError):
    """Something in results/ the report cannot be built around, said in one line."""


def build_report(study: str, results_root: Path, reports_root: Path) -> Path:
    """Write ``reports_root/<study>/index.html`` and its images; return the index path.

    Raises FileNotFoundError when ``results_root/<study>`` does not exist (a mistyped study);
    anything missing inside it (failed or running runs, absent tables) is shown on the page.
    """
    if not (Path(results_root) / study).is_dir():
        raise FileNotFoundError(f"no results for study {study!r} under {results_root}")
    data = StudyResults.load(Path(results_root), study)
    out_dir = Path(reports_root) / study
    out_dir.mkdir(parents=True, exist_ok=True)

    baseline, baseline_how = data.baseline()
    judged = judge_hypotheses(data, baseline)
    effect_rows, effect_mde = effects_table(data, baseline)
    tested_cells = sum(1 for row in effect_rows for m in report_columns() if star_direction(m) is not None)
    palette = arm_palette(data.arms)
    with plt.rc_context({"font.size": 9, "axes.titlesize": 10}):
        figures = {spec.name: render_figure(spec, data, palette, out_dir) for spec in FIGURES}
    grids, evaluation = sample_grids(data, out_dir)

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # the template is .html.j2, which select_autoescape would not match
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(
        study=design_context(data, baseline, baseline_how),
        ci_statement=CI_STATEMENT,
        metric_groups=metric_columns(),
        metric_rows=metrics_table(data),
        effect_rows=effect_rows,
        effect_mde=effect_mde,
        effect_mde_level=mde_level(tested_cells),
        hypotheses=hypotheses_context(data, judged),
        tuning=tuning_context(data),
        budget=budget_statement(data),
        figures=figures,
        sampler_checks=sampler_check_rows(data),
        samples=grids,
        evaluation=evaluation,
        runs=run_rows(data),
        notes=data.notes,
        built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        results_dir=str(Path(results_root) / study),
        no_clear_effect=stats.NO_CLEAR_EFFECT,
    )
    return atomic_write(out_dir / "index.html", lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
