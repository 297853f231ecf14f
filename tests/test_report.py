"""The report page, built from REAL Parquet written by the engine for a tiny study.

Study "smoke": arm T20 (baseline) and arm T50 differ in diffusion.T, two seeds each; arm
"broken" has one failed run (a runs row only) and one run that never started.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from browser import CHROMIUM, FLAGS, REQUIRE, require_chromium
from PIL import Image

from ddpm_engine import ExperimentConfig, run_experiment
from ddpm_engine.data import load_data
from harness.report import build_report
from harness.store.tables import write_table

STUDY = "smoke"
SEEDS = [0, 1]
ARMS = [
    {"arm": "T20", "levels": {"timesteps": "T20"}, "overrides": {"diffusion.T": 20}},
    {"arm": "T50", "levels": {"timesteps": "T50"}, "overrides": {"diffusion.T": 50}},
    {"arm": "broken", "levels": {"timesteps": "T5"}, "overrides": {"diffusion.T": 5}},
]
SECTIONS = [
    "Hypotheses",
    "Question and design",
    "Metrics per arm",
    "Effects against the baseline",
    "Per-t loss",
    "Per-t bias",
    "Variational bound per t",
    "Sample drift",
    "Samples",
    "Training curves",
    "Runs",
]


def tiny_config(T: int, seed: int) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {"base_channels": 16, "time_embed_dim": 32},
            "diffusion": {"T": T},
            "train": {"steps": 30, "batch_size": 32, "log_every": 10, "warmup_steps": 5, "seed": seed},
            "sample": {"num_samples": 16},
            "eval": {"probe_every": 15, "probe_images": 32, "quality": True, "drift_hist_steps": 5},
        }
    )


def run_key(config: ExperimentConfig, seed: int) -> str:
    text = json.dumps([config.to_dict(), seed], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class ParquetRecorder:
    """Writes each table of one run as Parquet and the sample grid as PNG, like the harness."""

    def __init__(self, results: Path, key: str):
        self.results, self.key = results, key

    def scalars(self, step, values):
        pass

    def table(self, name, frame):
        write_table(self.results, STUDY, name, self.key, frame)

    def image(self, name, pixels):
        path = self.results / STUDY / name / f"{self.key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def runs_row(key, arm, seed, status, error="", params=np.nan, seconds=np.nan, config=None):
    return pd.DataFrame(
        [
            {
                "study": STUDY,
                "arm": arm["arm"],
                "seed": seed,
                **arm["levels"],
                "status": status,
                "error": error,
                "mlflow_run_id": f"mlflow-{key}",
                "params": float(params),
                "seconds": float(seconds),
                "config_json": json.dumps(config.to_dict(), sort_keys=True) if config else "",
            }
        ]
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    (root / STUDY).mkdir()
    (root / STUDY / "study.json").write_text(
        json.dumps(
            {
                "study": STUDY,
                "question": "Does T explain <dark> samples?",
                "design": "arms",
                "axes": {"timesteps": ["T20", "T50", "T5"]},
                "baseline": {"timesteps": "T20"},
                "baseline_arm": "T20",
                "seeds": SEEDS,
                "arms": ARMS,
            }
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than contending
    try:
        data = load_data(tiny_config(20, 0).data)
        for arm in ARMS[:2]:
            for seed in SEEDS:
                config = tiny_config(arm["overrides"]["diffusion.T"], seed)
                key = run_key(config, seed)
                started = time.perf_counter()
                result = run_experiment(config, ParquetRecorder(root, key), device="cpu", data=data)
                write_table(
                    root,
                    STUDY,
                    "runs",
                    key,
                    runs_row(
                        key,
                        arm,
                        seed,
                        "finished",
                        params=result.summary["params"],
                        seconds=time.perf_counter() - started,
                        config=config,
                    ),
                )
    finally:
        torch.set_num_threads(threads)
    broken = tiny_config(5, 0)
    write_table(
        root,
        STUDY,
        "runs",
        run_key(broken, 0),
        runs_row(run_key(broken, 0), ARMS[2], 0, "failed", error="boom", seconds=1.0),
    )
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    return build_report(STUDY, results, tmp_path_factory.mktemp("reports"))


def section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert match, anchor
    return match.group(1)


def image_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]+)"', html)


def test_page_has_every_section_and_every_image_exists(report):
    assert report.name == "index.html" and report.exists()
    html = report.read_text()
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in html, heading
    sources = image_sources(html)
    # six figures and the two finished arms' sample grids
    assert len(sources) == 8, sources
    for src in sources:
        assert not src.startswith(("http:", "https:", "/")), src
        assert (report.parent / src).is_file(), src
    assert "could not be drawn" not in html and "could not be computed" not in html
    assert "http://" not in html and "https://" not in html  # no network from file://
    assert "Does T explain &lt;dark&gt; samples?" in html  # autoescaped
    assert "95% Student-t CI over n seeds" in html


def test_metrics_table_shows_the_failed_arm_as_failed(report):
    metrics = section(report.read_text(), "metrics")
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", metrics, re.S)
    broken = next(r for r in rows if ">broken<" in r)
    assert "failed" in broken and "no data" in broken
    assert "1 failed" in broken and "1 not started" in broken
    finished = next(r for r in rows if ">T50<" in r)
    assert "2 finished" in finished and "no data" not in finished
    assert "±" in finished  # two seeds: a confidence interval
    assert "★" in metrics or 'class="num best"' in metrics


def test_effects_are_paired_against_the_baseline(report):
    effects = section(report.read_text(), "effects")
    assert ">T50<" in effects and ">broken<" in effects and ">T20<" not in effects
    verdicts = re.findall(r'<span class="verdict">([^<]*)</span>', effects)
    assert verdicts and set(verdicts) <= {
        "better",
        "worse",
        "higher",
        "lower",
        "no clear effect",
        "no data",
        "n=1, no interval",
        "not comparable",
    }
    assert "no data" in verdicts  # the failed arm has no pairs
    # T = 50 against T = 20: the losses are eps MSEs over other noise levels
    assert verdicts.count("not comparable") == 2  # held-out loss and final train loss


def test_run_table_lists_every_run_with_status_and_reason(report):
    runs = section(report.read_text(), "runs")
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", runs, re.S)[1:]
    assert len(rows) == 6  # 3 arms x 2 seeds, including the one never started
    failed = next(r for r in rows if "failed" in r)
    assert "boom" in failed and "mlflow-" in failed
    assert sum("finished" in r for r in rows) == 4
    assert sum("not started" in r for r in rows) == 1


def test_report_builds_when_a_per_t_file_is_missing(results, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    victim = sorted((copy / STUDY / "per_t").glob("*.parquet"))[0]
    victim.unlink()
    index = build_report(STUDY, copy, tmp_path / "reports")
    html = index.read_text()
    assert "could not be drawn" not in html
    for src in image_sources(html):
        assert (index.parent / src).is_file()


def test_report_with_no_finished_run_omits_figures_with_notes(results, tmp_path):
    copy = tmp_path / "results"
    (copy / STUDY / "runs").mkdir(parents=True)
    shutil.copy(results / STUDY / "study.json", copy / STUDY)
    for path in (results / STUDY / "runs").glob("*.parquet"):
        frame = pd.read_parquet(path)
        if frame["status"].iloc[0] == "failed":
            shutil.copy(path, copy / STUDY / "runs")
    # a run that is still going: a runs row and nothing else
    write_table(copy, STUDY, "runs", "abcdef123456", runs_row("abcdef123456", ARMS[0], 0, "running"))
    index = build_report(STUDY, copy, tmp_path / "reports")
    html = index.read_text()
    assert image_sources(html) == []
    assert html.count('class="missing"') >= 6
    assert "running" in section(html, "runs") and "boom" in section(html, "runs")


def test_planned_run_keys_hide_stale_runs_and_show_pending_ones(results, tmp_path):
    """study.json may list the planned run keys (the harness writes them): rows of other keys
    are from an earlier version of the study, planned keys without a row are pending."""
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    runs = pd.concat([pd.read_parquet(p) for p in (copy / STUDY / "runs").glob("*.parquet")])
    manifest = json.loads((copy / STUDY / "study.json").read_text())
    manifest["runs"] = [
        {"run_key": k, "arm": a, "seed": int(s)} for k, a, s in zip(runs["run_key"], runs["arm"], runs["seed"])
    ]
    manifest["runs"].append({"run_key": "0123456789ab", "arm": "broken", "seed": 1})
    (copy / STUDY / "study.json").write_text(json.dumps(manifest))
    write_table(copy, STUDY, "runs", "5ta1e5ta1e00", runs_row("5ta1e5ta1e00", ARMS[0], 0, "failed", error="old config"))
    html = build_report(STUDY, copy, tmp_path / "reports").read_text()
    table = section(html, "runs")
    assert "0123456789ab" in table and "pending" in table
    assert "5ta1e5ta1e00" not in table and "old config" not in table
    assert "earlier version of this study" in html


def test_unknown_study_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report("no_such_study", tmp_path, tmp_path / "reports")


# ------------------------------------------------------- hand-made tables, known answers

HAND = "handmade_effects"
HAND_SEEDS = [0, 1, 2]
# fd (lower is better): "sharp" is lower on every seed by about 2 (a clear paired effect);
# "noisy" has a lower mean than the baseline too, but its paired differences disagree in sign.
HAND_FD = {"base": [10.0, 12.0, 14.0], "sharp": [8.0, 9.9, 12.1], "noisy": [7.0, 13.0, 13.4]}
HAND_W1 = {"base": [0.30, 0.32, 0.31], "sharp": [0.10, 0.12, 0.11], "noisy": [0.29, 0.33, 0.30]}
T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[Path, str]:
    from handmade import write_run, write_study

    root = tmp_path_factory.mktemp("handmade")
    write_study(root, HAND, list(HAND_FD), HAND_SEEDS, "base")
    for arm in HAND_FD:
        for i, seed in enumerate(HAND_SEEDS):
            write_run(
                root, HAND, arm, seed, quality=pd.DataFrame([{"fd": HAND_FD[arm][i], "hist_w1": HAND_W1[arm][i]}])
            )
    html = build_report(HAND, root, tmp_path_factory.mktemp("handmade_reports")).read_text()
    return root, html


def _cells(row_html: str) -> list[str]:
    return re.findall(r"<td[^>]*>.*?</td>", row_html, re.S)


def _row(table_html: str, arm: str) -> str:
    return next(r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table_html, re.S) if f">{arm}<" in r or f">{arm} <" in r)


def test_paired_effects_equal_hand_computed_numbers(handmade):
    from harness.report.results import StudyResults
    from harness.study import stats

    root, _ = handmade
    data = StudyResults.load(root, HAND)
    values = {"fd": data.metric("fd")}
    # sharp - base per seed: -2.0, -2.1, -1.9: mean -2, sample std 0.1
    diff, half, n = stats.paired_effect(values["fd"]["sharp"], values["fd"]["base"])
    assert n == 3 and diff == pytest.approx(-2.0)
    assert half == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert stats.verdict(diff, half, n, stats.LOWER) == "better"
    # noisy - base per seed: -3.0, +1.0, -0.6: mean -0.8667 (looks better), sample std 2.0134
    diff, half, n = stats.paired_effect(values["fd"]["noisy"], values["fd"]["base"])
    diffs = np.array([-3.0, 1.0, -0.6])
    assert diff == pytest.approx(diffs.mean()) and diff < 0
    assert half == pytest.approx(T_975_DF2 * diffs.std(ddof=1) / math.sqrt(3))
    assert diff + half > 0  # the CI includes zero
    assert stats.verdict(diff, half, n, stats.LOWER) == "no clear effect"


def test_page_marks_clear_effects_and_never_calls_an_unclear_one_better(handmade):
    from ddpm_engine.metrics import report_columns

    METRICS = [m.name for m in report_columns()]
    _, html = handmade
    effects = section(html, "effects")
    assert "95% Student-t CI over the n pairs" in effects and "n − 1 degrees of freedom" in effects
    fd = 2 + list(METRICS).index("fd")  # after the arm and pairs cells
    sharp = _cells(_row(effects, "sharp"))[fd]
    assert "eff-better" in sharp and ">better<" in sharp and "✱" in sharp
    # fd is a log-scale metric: the cell is the ratio sharp / base (geometric mean of 0.8,
    # 0.825, 0.864) with the t interval of the log ratios taken back to ratios
    assert "×0.829" in sharp and "(0.75–0.91)" in sharp
    assert "ratio arm/baseline, 95% CI 0.753 to 0.914 over 3 pairs; Holm-adjusted p = " in sharp
    noisy_row = _row(effects, "noisy")
    noisy = _cells(noisy_row)[fd]
    assert ">no clear effect<" in noisy and "eff-none" in noisy and "✱" not in noisy
    assert "×0.899" in noisy and "95% CI 0.514 to 1.57" in noisy
    assert "better" not in noisy_row and "eff-better" not in noisy_row


def test_best_star_only_for_a_clear_best(handmade):
    """sharp has the best fd mean but its lead over noisy lies inside the paired CI: no star.
    On hist_w1 sharp is lower than both other arms on every seed: starred."""
    from ddpm_engine.metrics import report_columns

    METRICS = [m.name for m in report_columns()]
    _, html = handmade
    metrics = section(html, "metrics")
    assert metrics.count('class="num best"') == 1
    starred = _cells(_row(metrics, "sharp"))[2 + list(METRICS).index("hist_w1")]
    assert 'class="num best"' in starred


# ---------------------------------------------------------------------------- browser

# without chromium: skipped, except under DDPM_ABLATE_REQUIRE_SERVERS=1 (CI), where chromium() fails
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRE, reason="chromium is not on PATH (CI installs the Debian package)"
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [require_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@needs_chromium
def test_page_renders_in_chromium(report, tmp_path):
    shot = tmp_path / "screenshot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", report.as_uri())
    assert shot.exists()
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and figures, not a blank page
    assert np.asarray(image).mean() < 254


@needs_chromium
def test_every_image_loads_without_console_errors(report, tmp_path):
    done = chromium(
        tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", report.as_uri()
    )
    match = re.search(r'<body[^>]*data-images-ok="([^"]*)"', done.stdout)
    assert match, "the load handler did not run:\n" + done.stdout[:500]
    assert match.group(1) == "yes", f"broken images: {match.group(1)}"
    page_errors = [
        line for line in done.stderr.splitlines() if "Uncaught" in line or ("CONSOLE" in line and report.name in line)
    ]
    assert page_errors == []


def test_an_effect_that_does_not_survive_holm_is_not_starred(tmp_path):
    """Four arms, each 0.75-1.2 below the baseline's fd on every seed: each 95% CI excludes 0
    (p = 0.0171 alone), but four tests at once: Holm multiplies the smallest p by 4 (0.0683), so
    no cell is starred or called better, while each still shows its interval."""
    from handmade import write_run, write_study
    from scipy import stats as scipy_stats

    arms = ["base", "a", "b", "c", "d"]
    write_study(tmp_path, "holm", arms, HAND_SEEDS, "base")
    base = [10.0, 12.0, 14.0]
    diffs = [-1.0, -1.2, -0.75]
    assert scipy_stats.ttest_1samp(diffs, 0).pvalue == pytest.approx(0.0171, abs=5e-4)
    for arm in arms:
        for i, seed in enumerate(HAND_SEEDS):
            fd = base[i] + (0 if arm == "base" else diffs[i])
            write_run(tmp_path, "holm", arm, seed, quality=pd.DataFrame([{"bpd": fd}]))
    effects = section(build_report("holm", tmp_path, tmp_path / "reports").read_text(), "effects")
    assert '<span class="sig"' not in effects and ">better<" not in effects
    assert effects.count("Holm-adjusted p = 0.0683") == 4  # 4 x 0.01708
    assert "minimum detectable effect" in effects


def test_minimum_detectable_ratio_is_shown_as_a_ratio_and_capped():
    from harness.report.page import _mde_text

    assert _mde_text(1.0, log=True) == "×2.72"
    assert _mde_text(380.0, log=True) == "> ×1,000"  # not a 165-digit number
    assert _mde_text(0.25, log=False) == "0.25"


# ------------------------------------------------------------------ hypotheses matrix


def _judged_row(name: str, arm: str, verdict: str, **extra) -> dict:
    row = {
        "name": name,
        "arm": arm,
        "metric": "fd",
        "versus": "none",
        "expect": "below",
        "value": 20.0,
        "n": 3,
        "estimate": 10.0,
        "ci_low": 9.0,
        "ci_high": 11.0,
        "p_value": 0.001,
        "p_adjusted": 0.004,
        "verdict": verdict,
        "says": "",
        "sentence": f"{arm}: the whole sentence of {name}.",
        "look_n": 3,
        "scale": "linear",
    }
    return {**row, **extra}


def test_hypothesis_matrix_places_each_verdict_in_its_row_and_arm_column():
    """Rows in the judged frame's order, columns in the study's arm order whatever the rows'
    order, an unjudged pair as an empty cell, and a summary that counts (hypothesis, arm) rows."""
    from harness.report.page import hypothesis_matrix

    judged = pd.DataFrame(
        [
            _judged_row("darker", "c", "supported", versus="baseline", expect="above", value=0.0, says=" c is darker "),
            _judged_row("darker", "b", "refuted", versus="baseline", expect="above", value=0.0),
            _judged_row("only_b", "b", "supported"),
            _judged_row("all", "a", "inconclusive", n=0, estimate=math.nan, ci_low=math.nan, ci_high=math.nan),
            _judged_row("all", "b", "supported"),
            _judged_row("all", "c", "inconclusive"),
            _judged_row("gone", "removed", "inconclusive", n=0, estimate=math.nan),
        ]
    )
    matrix = hypothesis_matrix(judged, ["a", "b", "c", "unjudged_arm"])
    assert matrix["arms"] == ["a", "b", "c", "removed"]  # study order; an arm no hypothesis names has no column
    assert [r["name"] for r in matrix["rows"]] == ["darker", "only_b", "all", "gone"]
    grid = {r["name"]: [c["verdict"] if c["judged"] else None for c in r["cells"]] for r in matrix["rows"]}
    assert grid == {
        "darker": [None, "refuted", "supported", None],
        "only_b": [None, "supported", None, None],
        "all": ["inconclusive", "supported", "inconclusive", None],
        "gone": [None, None, None, "inconclusive"],
    }
    darker = matrix["rows"][0]
    assert darker["says"] == "c is darker" and darker["quantity"] == "fd − baseline" and darker["expected"] == "above 0"
    assert darker["cells"][0]["title"] == "darker: not judged on a"
    supported = darker["cells"][2]
    assert supported["title"] == "c: the whole sentence of darker."
    assert supported["measured"] == "+10 [9 to 11]" and supported["p_adj"] == "0.004"
    assert matrix["rows"][2]["cells"][0]["measured"] == "no finished run with this metric"
    assert matrix["total"] == 7
    assert [(s["verdict"], s["count"], s["names"]) for s in matrix["summary"]] == [
        ("supported", 3, ["darker on c", "only_b on b", "all on b"]),
        ("refuted", 1, ["darker on b"]),
        ("inconclusive", 3, []),
    ]


def test_hypothesis_matrix_of_a_log_scale_ratio_reads_as_a_ratio():
    from harness.report.page import hypothesis_matrix

    row = _judged_row("sharper", "a", "supported", versus="baseline", value=0.0, scale="log", estimate=0.83)
    cell = hypothesis_matrix(pd.DataFrame([row]), ["a"])["rows"][0]["cells"][0]
    assert cell["measured"] == "×0.83 [9 to 11]"


# a study whose hypotheses reach all three verdicts, with markup in an arm, a name and a claim
MARKED = "<i>noisy</i> & co"
VERDICT_ARMS = {"base": "base", "sharp": "sharp", MARKED: "noisy"}
VERDICT_HYPOTHESES = {
    "sharper_than_base": {
        "metric": "fd",
        "versus": "baseline",
        "expect": "below",
        "value": 0.0,
        "says": "a <b>sharper</b> arm & a lower FD",
    },
    "w1_small": {"metric": "hist_w1", "expect": "below", "value": 0.2},
    "sharp<only>": {"metric": "hist_w1", "arm": "sharp", "expect": "below", "value": 0.5},
}


@pytest.fixture(scope="module")
def judged_report(tmp_path_factory) -> tuple[Path, Path]:
    from handmade import write_run, write_study

    root = tmp_path_factory.mktemp("judged")
    write_study(root, "verdicts", list(VERDICT_ARMS), HAND_SEEDS, "base", hypotheses=VERDICT_HYPOTHESES)
    for arm, values in VERDICT_ARMS.items():
        for i, seed in enumerate(HAND_SEEDS):
            quality = pd.DataFrame([{"fd": HAND_FD[values][i], "hist_w1": HAND_W1[values][i]}])
            write_run(root, "verdicts", arm, seed, quality=quality)
    index = build_report("verdicts", root, tmp_path_factory.mktemp("judged_reports"))
    return root / "verdicts" / "hypotheses.parquet", index


# what the reader sees of the matrix and the summary, read from the rendered DOM
MATRIX_JS = """(() => {
  const section = document.getElementById("hypotheses");
  const table = section.querySelector("table.hyp-matrix");
  const arms = [...table.rows[0].querySelectorAll("th[data-arm]")].map(th => th.textContent);
  const rows = [...table.querySelectorAll("tr[data-hypothesis]")].map(tr => ({
    name: tr.dataset.hypothesis,
    claim: tr.querySelector("th").textContent.replace(/\\s+/g, " ").trim(),
    cells: [...tr.querySelectorAll("td")].map(td => ({
      arm: td.dataset.arm,
      judged: !td.classList.contains("unjudged"),
      word: (td.querySelector(".word") || td).textContent.trim(),
      title: td.title,
      background: getComputedStyle(td).backgroundColor,
    })),
  }));
  const summary = [...section.querySelectorAll("ul.hyp-summary li")].map(li => ({
    verdict: li.dataset.verdict,
    text: li.textContent.replace(/\\s+/g, " ").trim(),
  }));
  const order = [...section.querySelectorAll("ul.hyp-summary, table.hyp-matrix, details, table.hypotheses")]
    .map(e => e.tagName.toLowerCase() + "." + e.className);
  return {arms, rows, summary, order, tags: section.querySelectorAll("i, b, only").length};
})()"""


@needs_chromium
def test_hypotheses_matrix_in_chromium_matches_the_parquet(judged_report, tmp_path):
    from browser import DevTools

    parquet, index = judged_report
    judged = pd.read_parquet(parquet)
    verdicts = {(r.name, r.arm): r.verdict for r in judged.itertuples()}
    assert set(verdicts.values()) == {"supported", "refuted", "inconclusive"}  # the fixture reaches each
    with DevTools(tmp_path / "profile") as page:
        page.navigate(index.as_uri())
        assert page.wait_for("document.readyState === 'complete'", timeout=30)
        seen = page.evaluate(MATRIX_JS)

    # columns: every judged arm once, in the study's order; markup in names is text, not elements
    assert seen["arms"] == [a for a in VERDICT_ARMS if a in set(judged["arm"])]
    assert seen["tags"] == 0
    assert [r["name"] for r in seen["rows"]] == list(VERDICT_HYPOTHESES)
    cells = [(row["name"], cell["arm"]) for row in seen["rows"] for cell in row["cells"]]
    assert len(cells) == len(set(cells)) == len(seen["rows"]) * len(seen["arms"])  # one cell per grid pair
    for row in seen["rows"]:
        for cell in row["cells"]:
            pair = (row["name"], cell["arm"])
            if pair in verdicts:
                assert cell["judged"] and cell["word"] == verdicts[pair], pair
                assert cell["title"] == judged.set_index(["name", "arm"]).loc[pair, "sentence"]
            else:
                assert not cell["judged"] and cell["word"] == "–" and "not judged" in cell["title"], pair
    assert {c["arm"] for r in seen["rows"] if r["name"] == "sharp<only>" for c in r["cells"] if c["judged"]} == {
        "sharp"
    }
    backgrounds = {c["word"]: c["background"] for r in seen["rows"] for c in r["cells"]}
    assert len({backgrounds[v] for v in ("supported", "refuted", "inconclusive")}) == 3  # told apart by colour
    claim = next(r["claim"] for r in seen["rows"] if r["name"] == "sharper_than_base")
    assert "a <b>sharper</b> arm & a lower FD" in claim

    # the summary: at most three lines whose counts are the parquet's
    counts = judged["verdict"].value_counts()
    lines = {line["verdict"]: line["text"] for line in seen["summary"]}
    assert len(seen["summary"]) <= 3
    for verdict in ("supported", "refuted"):
        assert lines[verdict].startswith(f"{verdict.capitalize()} ({counts.get(verdict, 0)})"), lines[verdict]
        for name, arm in (pair for pair, v in verdicts.items() if v == verdict):
            assert name in lines[verdict] and arm in lines[verdict]
    assert lines["inconclusive"] == f"Inconclusive: {counts.get('inconclusive', 0)} of {len(judged)} rows"

    # the answers first, the sentences and the detailed table below
    assert seen["order"] == ["ul.hyp-summary plain", "table.hyp-matrix", "details.hyp-sentences", "table.hypotheses"]


def test_a_loss_in_each_arms_own_objective_or_noise_levels_is_not_compared_across_them(tmp_path):
    # objective_ablation's report starred kept_wt's final train loss "better, x0.029": the
    # w_t-weighted loss is another quantity than L_simple, not a 34 times smaller one; and
    # terminal_snr's called the rescaled schedules' held-out eps MSE "better": an average over
    # other noise levels is another task, not a better model
    from handmade import write_run, write_study

    from harness.report.page import NOT_COMPARABLE, effects_table, metrics_table, report_columns
    from harness.report.results import StudyResults

    arms = ["base", "same", "vlb", "cosine", "tilde"]
    write_study(tmp_path, "objectives", arms, [0, 1, 2], "base")
    loss = {"base": 0.040, "same": 0.030, "vlb": 0.001, "cosine": 0.020, "tilde": 0.030}
    for arm in arms:
        config = {
            "objective": {"weighting": "vlb" if arm == "vlb" else "simple"},
            "train": {"t_range": None},
            # the reverse variance is used by sampling alone: the losses are the same quantity
            "diffusion": {"T": 200, "schedule": "cosine" if arm == "cosine" else "linear"}
            | {"sigma": "beta_tilde" if arm == "tilde" else "beta"},
        }
        for seed in (0, 1, 2):
            wobble = {"base": (1.0, 1.01, 0.99), "same": (1.0, 0.98, 1.015), "vlb": (1.0, 1.02, 0.97)}
            wobble = wobble.get(arm, (1.0, 0.98, 1.015))[seed]
            quality = pd.DataFrame([{"final_loss": loss[arm] * wobble, "heldout_loss": loss[arm] * wobble}])
            write_run(tmp_path, "objectives", arm, seed, config=config, quality=quality)
    data = StudyResults.load(tmp_path, "objectives")
    names = [m.name for m in report_columns()]
    rows, _ = effects_table(data, "base")
    for metric in ("final_loss", "heldout_loss"):
        cells = {row["arm"]: row["cells"][names.index(metric)] for row in rows}
        assert cells["cosine"]["verdict"] == NOT_COMPARABLE and not cells["cosine"]["excludes_zero"], metric
        assert "different noise levels" in cells["cosine"]["title"]
        for arm in ("same", "tilde"):  # same objective and noise levels: tested
            assert cells[arm]["verdict"] == "better" and cells[arm]["excludes_zero"], (metric, arm)
        # no best arm across objectives or noise levels
        assert not any(row["cells"][names.index(metric)]["best"] for row in metrics_table(data)), metric
    final = {row["arm"]: row["cells"][names.index("final_loss")] for row in rows}
    assert final["vlb"]["verdict"] == NOT_COMPARABLE and not final["vlb"]["excludes_zero"]
    assert "different objectives" in final["vlb"]["title"]
    held = {row["arm"]: row["cells"][names.index("heldout_loss")] for row in rows}
    assert held["vlb"]["verdict"] == "better"  # an eps MSE on the same noise levels, whatever the weighting
