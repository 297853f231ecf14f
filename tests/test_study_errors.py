"""Bad study files: exit code 2, one message naming file, line and key path, no traceback."""

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from harness.cli import app

HEADER = "study: s\nquestion: Does it validate?\n"

CASES = {
    "unknown_key": (
        HEADER + "base:\n  diffusion: {T: 100, schedul: cosine}\n",
        ":4:",
        "base.diffusion.schedul",
        "did you mean 'schedule'",
    ),
    "unknown_top_level_key": ("study: s\nquestoin: q\n", ":2:", "questoin", "did you mean 'question'"),
    "wrong_type": (HEADER + "base:\n  train: {steps: many}\n", ":4:", "base.train.steps", "valid integer"),
    "out_of_range": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {diffusion.T: 1}\n",
        ":6:",
        "ablations.a.y.diffusion.T",
        "greater than or equal to 2",
    ),
    "override_of_missing_field": (
        HEADER + "ablations:\n  a:\n    x: {train.stepz: 5}\n",
        ":5:",
        "ablations.a.x.train.stepz",
        "did you mean 'train.steps'",
    ),
    "duplicate_level": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    x: {train.steps: 6}\n",
        ":6:",
        "ablations.a.x",
        "duplicate key 'x'",
    ),
    "baseline_names_missing_level": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\nbaseline: {a: z}\n",
        ":6:",
        "baseline.a",
        "no level 'z'",
    ),
    "empty_axis": (HEADER + "ablations:\n  a: {}\n", ":4:", "ablations.a", "empty expansion"),
    "no_seeds": (HEADER + "seeds: []\n", ":3:", "seeds", "empty expansion"),
    "adaptive_seeds_typo": (HEADER + "seeds: {strat: 3, max: 8}\n", ":3:", "seeds.strat", "did you mean 'start'"),
    "adaptive_seeds_max_below_start": (HEADER + "seeds: {start: 4, max: 3}\n", ":3:", "seeds", "at least start"),
    "adaptive_seeds_one_to_start": (HEADER + "seeds:\n  start: 1\n  max: 8\n", ":4:", "seeds.start", "greater than"),
    "malformed_yaml": (HEADER + "ablations:\n  a: {x: [1, 2}\n", ":4:", "", "malformed YAML"),
    "missing_data_folder": (
        HEADER + "base:\n  data: {name: image_folder, path: /nonexistent/faces}\n",
        ":4:",
        "base.data.path",
        "/nonexistent/faces",
    ),
    "invalid_combination": (
        HEADER + "ablations:\n  start:\n    lo: {diffusion.beta_start: 0.001}\n    hi: {diffusion.beta_start: 0.01}\n"
        "  end:\n    lo: {diffusion.beta_end: 0.005}\n    hi: {diffusion.beta_end: 0.02}\n",
        ":",
        "ablations",
        "beta_start must not exceed beta_end",
    ),
    "hypothesis_unknown_metric": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {train.steps: 6}\nhypotheses:\n"
        "  h1:\n    metric: fid\n    expect: below\n",
        ":9:",
        "hypotheses.h1.metric",
        "did you mean 'fd'",
    ),
    "hypothesis_unknown_arm": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {train.steps: 6}\nhypotheses:\n"
        "  h1:\n    metric: bpd\n    arm: yy\n    expect: below\n",
        ":10:",
        "hypotheses.h1.arm",
        "did you mean 'y'",
    ),
    "hypothesis_bad_expect": (
        HEADER + "hypotheses:\n  h1:\n    metric: bpd\n    expect: higher\n",
        ":6:",
        "hypotheses.h1.expect",
        "'above'",
    ),
    "hypothesis_within_without_margin": (
        HEADER + "hypotheses:\n  h1:\n    metric: bpd\n    expect: within\n",
        ":4:",
        "hypotheses.h1",
        "margin value > 0",
    ),
    "hypothesis_log_metric_nonpositive_threshold": (
        HEADER + "hypotheses:\n  h1:\n    metric: fd\n    expect: below\n    value: 0\n",
        ":7:",
        "hypotheses.h1.value",
        "fd is positive and judged on a log scale: the threshold must be > 0, got 0",
    ),
    "hypothesis_log_metric_within_own_value": (
        HEADER + "hypotheses:\n  h1:\n    metric: heldout_loss\n    expect: within\n    value: 0.1\n",
        ":6:",
        "hypotheses.h1.expect",
        "state `below` (or `above`) a value > 0",
    ),
    "hypothesis_log_metric_ratio_threshold": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {train.steps: 6}\nhypotheses:\n"
        "  h1:\n    metric: heldout_loss\n    versus: baseline\n    expect: below\n    value: -0.1\n",
        ":12:",
        "hypotheses.h1.value",
        "ratio arm/baseline (log scale): `below` takes value 0 (a ratio of 1), got -0.1",
    ),
    # terminal_snr's report called the rescaled schedules' held-out eps MSE "better": an
    # average over other noise levels is another quantity, so no hypothesis may compare it
    "hypothesis_loss_across_noise_levels": (
        HEADER + "ablations:\n  a:\n    x: {diffusion.schedule: linear}\n    y: {diffusion.schedule: cosine}\n"
        "hypotheses:\n  h1:\n    metric: heldout_loss\n    arm: y\n    versus: baseline\n    expect: below\n",
        ":9:",
        "hypotheses.h1.metric",
        "heldout_loss is measured in each run's own noise levels (diffusion.*: T and the schedule), and arm 'y' "
        "differs from the baseline 'x'",
    ),
    "hypothesis_train_loss_across_objectives_every_arm": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {objective.weighting: vlb}\n"
        "hypotheses:\n  h1:\n    metric: final_loss\n    versus: baseline\n    expect: below\n",
        ":9:",
        "hypotheses.h1.metric",
        "final_loss is measured in each run's own objectives (objective.*, train.t_range), and arm 'y'",
    ),
    "hypothesis_value_boolean": (
        HEADER + "hypotheses:\n  h1:\n    metric: bpd\n    expect: above\n    value: true\n",
        ":7:",
        "hypotheses.h1.value",
        "a boolean is not a number here",
    ),
    "hypothesis_unknown_key": (
        HEADER + "hypotheses:\n  h1:\n    metric: bpd\n    expect: above\n    versu: baseline\n",
        ":7:",
        "hypotheses.h1.versu",
        "did you mean 'versus'",
    ),
    "seed_too_large": (
        HEADER + "seeds: [0, 18446744073709551616]\n",
        ":3:",
        "seeds.1",
        "less than or equal to 4294967295",
    ),
    # arms whose labels collide would be merged silently into one arm
    "one_at_a_time_level_named_baseline": (
        HEADER + "design: one_at_a_time\nablations:\n  a:\n    x: {train.steps: 5}\n    baseline: {train.steps: 6}\n",
        ":7:",
        "ablations.a.baseline",
        "two arms get the label 'baseline'",
    ),
    "factorial_labels_collide": (
        HEADER + "design: factorial\nablations:\n  a:\n    x-y: {train.steps: 5}\n    x: {train.steps: 6}\n"
        "  b:\n    z: {train.lr: 0.001}\n    y-z: {train.lr: 0.002}\n",
        ":10:",
        "ablations.b.y-z",
        "'x-y-z' from ablations.b.z (line 9) and 'x-y-z' from ablations.b.y-z (line 10)",
    ),
    "arm_labels_differ_only_in_case": (
        HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n    y: {train.steps: 6}\n"
        "arms:\n  Fast: {a: x}\n  fast: {a: y}\n",
        ":9:",
        "arms.fast",
        "two arms get the label 'fast'",
    ),
    "study_name_too_long": ("study: " + "s" * 300 + "\nquestion: q\n", ":1:", "study", "at most 100 characters"),
    "yaml_nested_too_deep": (HEADER + "base: " + "[" * 5000 + "]" * 5000 + "\n", "", "", "nested more than 100"),
    "missing_data_folder_in_a_level": (
        HEADER + "ablations:\n  d:\n    folder: {data.name: image_folder, data.path: /nonexistent/x}\n"
        "    digits: {data.name: digits}\n",
        ":5:",
        "ablations.d.folder.data.path",
        "/nonexistent/x does not exist",
    ),
    # found before any training: each would have failed (or done nothing) only after it
    "levels_beyond_uint8": (HEADER + "base:\n  data: {levels: 300}\n", ":4:", "base.data.levels", "at most 256"),
    "too_few_images_for_quality": (
        HEADER + "base:\n  data: {max_images: 2}\n",
        ":4:",
        "base.data.max_images",
        "2 images leave 1 for training",
    ),
    "t_range_beyond_T": (
        HEADER + "base:\n  diffusion: {T: 100}\n  train: {t_range: [1, 200]}\n",
        ":5:",
        "base.train.t_range",
        "[lo, hi] must lie within 1..diffusion.T = 100 (got [1, 200])",
    ),
    "t_range_reversed": (
        HEADER + "ablations:\n  range:\n    all: {}\n    small_t: {train.t_range: [10, 1]}\n",
        ":6:",
        "ablations.range.small_t.train.t_range",
        "needs 1 <= lo <= hi",
    ),
    "t_range_from_zero": (
        HEADER + "base:\n  train:\n    t_range: [0, 10]\n",
        ":5:",
        "base.train.t_range",
        "needs 1 <= lo <= hi (t is 1-based)",
    ),
    "t_range_beyond_the_T_of_a_level": (
        HEADER + "base:\n  train: {t_range: [1, 10]}\nablations:\n  T:\n    T1000: {diffusion.T: 1000}\n"
        "    T5: {diffusion.T: 5}\n",
        ":8:",
        "ablations.T.T5",
        "train.t_range: [lo, hi] must lie within 1..diffusion.T = 5",
    ),
    "max_images_beyond_the_digits": (
        HEADER + "base:\n  data: {max_images: 5000}\n",
        ":4:",
        "base.data.max_images",
        "5,000 images asked for, but there are 1,797 in the digits (training and held out together)",
    ),
    "one_sample_for_quality": (
        HEADER + "base:\n  sample: {num_samples: 1}\n",
        ":4:",
        "base.sample.num_samples",
        "1 sample: the sample-quality metrics need at least 2",
    ),
    "more_levels_than_the_image_can_halve": (
        HEADER + "base:\n  model: {channel_mults: [1, 1, 1, 1, 1]}\n",
        ":4:",
        "base.model.channel_mults",
        "image_size 8 cannot be halved 4 times",
    ),
    "attention_at_a_side_never_reached": (
        HEADER + "ablations:\n  attn:\n    none: {model.attention_resolutions: []}\n"
        "    three: {model.attention_resolutions: [3]}\n",
        ":6:",
        "ablations.attn.three.model.attention_resolutions",
        "attention at side 3: no feature map of this UNet on 8x8 images has that side, so none would be added; "
        "its sides are 8, 4, 2",
    ),
    "billion_laughs": (
        HEADER
        + "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
            f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(8)
        ),
        "",
        "",
        "more than 100,000 nodes",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["plan", "run"])
def test_bad_study_file_exits_2_naming_file_line_and_key(tmp_path, monkeypatch, case, command):
    text, line, key, reason = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    args = [command, str(path)] + (["--no-measure"] if command == "plan" else [])
    result = CliRunner().invoke(app, args)
    out = " ".join(result.output.split())  # rich may wrap long lines
    assert result.exit_code == 2, result.output
    assert f"{path}{line}" in out.replace(" ", "") or (line in (":", "") and str(path) in out)
    assert key in out and reason in out, out
    assert "Traceback" not in result.output
    # nothing was started or written
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()


def test_bad_set_option_names_the_key(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(HEADER)
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure", "--set", "train.stepz=3"])
    assert result.exit_code == 2
    assert "--set" in result.output and "train.stepz" in result.output and "train.steps" in result.output


def test_console_script_prints_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(textwrap.dedent(CASES["unknown_key"][0]))
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "typo.yaml:4: base.diffusion.schedul: unknown key (did you mean 'schedule'?)" in " ".join(
        proc.stderr.split()
    )


def test_report_of_a_study_never_run_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "never.yaml"
    path.write_text("study: never\nquestion: q\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no results for study 'never'" in " ".join(result.output.split())


def test_a_study_file_that_is_not_utf8_names_the_line(tmp_path, monkeypatch):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(HEADER.encode() + "base: {data: {name: caf\xe9}}\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{path}:3:" in out.replace(" ", "") and "not UTF-8" in out


def test_bracketed_text_in_a_message_is_printed_as_written(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(HEADER)
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure", "--set", "train.[lr]=3"])
    assert result.exit_code == 2 and "train.[lr]" in result.output


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("train.seed=5", "comes from the study's `seeds` list"),
        ("diffusion.T=100", "every arm of this study sets this key"),
    ],
)
def test_set_options_that_would_do_nothing_are_errors(tmp_path, option, reason):
    path = tmp_path / "two.yaml"
    path.write_text(HEADER + "ablations:\n  t:\n    a: {diffusion.T: 20}\n    b: {diffusion.T: 10}\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure", "--set", option])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "--set" in out and reason in out


def test_two_axes_setting_one_key_in_an_arm_is_an_error(tmp_path):
    path = tmp_path / "clash.yaml"
    path.write_text(HEADER + "ablations:\n  a:\n    x: {train.steps: 5}\n  b:\n    y: {train.steps: 6}\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "clash.yaml:7:" in out.replace(" ", "") and "from both a.x and b.y" in out


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("train.steps=0", "greater than or equal to 1"),
        ("data.max_images=2", "2 images leave 1 for training"),
        ("model.attention_resolutions=[3]", "its sides are 8, 4, 2"),
    ],
)
def test_a_set_value_that_cannot_work_is_named_at_the_set_option(tmp_path, option, reason):
    """Not at the study file's base line, which has no part in it."""
    path = tmp_path / "ok.yaml"
    path.write_text(HEADER + "base:\n  train: {steps: 5}\n  data: {max_images: 100}\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure", "--set", option])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"error: --set: {option.split('=')[0]}: " in out and reason in out
    assert "ok.yaml" not in out


def test_a_missing_data_folder_given_with_set_is_named_at_the_set_option(tmp_path):
    path = tmp_path / "folder.yaml"
    path.write_text(HEADER + "base:\n  data: {name: image_folder, path: /nonexistent/a}\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--no-measure", "--set", "data.path=/nonexistent/b"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "error: --set: data.path: data.path /nonexistent/b does not exist" in out


@pytest.mark.parametrize("command", ["plan", "run"])
def test_max_images_beyond_an_image_folder_is_named_at_its_line(tmp_path, monkeypatch, command):
    """An image folder's size is known once it is read: the cap is checked then, before any
    training, and named at data.max_images (not at data.path, where other data errors go)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "four"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    path = tmp_path / "folder.yaml"
    path.write_text(
        HEADER + f"base:\n  data:\n    name: image_folder\n    path: {folder}\n    cache_dir: {tmp_path / 'cache'}\n"
        "    max_images: 10\n"
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [command, str(path)] + (["--no-measure"] if command == "plan" else []))
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"{path}:8:" in out.replace(" ", "") and "base.data.max_images" in out
    assert "10 images asked for, but there are 4 in image_folder:four" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()


def test_a_loss_hypothesis_across_reverse_variances_is_accepted(tmp_path):
    # the reverse variance is used by sampling alone: the held-out eps MSE is the same quantity
    from harness.study.spec import load_study

    path = tmp_path / "sigma.yaml"
    path.write_text(
        HEADER + "ablations:\n  a:\n    x: {diffusion.sigma: beta}\n    y: {diffusion.sigma: beta_tilde}\n"
        "hypotheses:\n  h1:\n    metric: heldout_loss\n    versus: baseline\n    expect: below\n"
    )
    assert load_study(path).hypotheses["h1"].metric == "heldout_loss"
