"""The shipped studies validate, expand as their questions say, and run on the default data."""

from pathlib import Path

import pytest

from harness.study.plan import baseline_arm, changed_keys, expand, expand_arms
from harness.study.spec import load_study

STUDY_DIR = Path(__file__).parent.parent / "studies"
STUDIES = sorted(STUDY_DIR.glob("*.yaml"))


def test_every_question_of_the_seed_research_has_a_study():
    names = {p.stem for p in STUDIES}
    assert {
        "timestep_ablation",
        "capacity_ablation",
        "time_embedding_ablation",
        "objective_ablation",
        "darkening_diagnosis",
        "error_accumulation",
    } <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_validates_and_runs_on_digits(path):
    study = load_study(path)
    runs = expand(study)
    assert runs and len({r.key for r in runs}) == len(runs)
    # the embedded digits, or Fashion-MNIST for the study whose question needs real images
    assert all(r.config.data.name == ("fashion_mnist" if path.stem.startswith("fashion") else "digits") for r in runs)
    assert study.question.strip()


def test_fashion_darkening_is_the_logs_first_run_plus_five_single_changes():
    study = load_study("studies/fashion_darkening.yaml")
    arms = expand_arms(study)
    assert [a.label for a in arms] == ["baseline", "cosine", "clip_x0", "ema", "wider", "steps_3000"]
    assert len(study.seeds) >= 3
    runs = {r.arm.label: r for r in expand(study) if r.seed == study.seeds[0]}
    base = runs["baseline"].config
    assert base.diffusion.schedule == "linear" and base.diffusion.T == 1000 and base.model.time_mlp == "shared"
    assert base.train.ema_decay is None and not base.sample.clip_x0 and base.model.preset == "tiny"
    # the x_0-clipping arm only samples differently: it shares the baseline's training
    assert runs["clip_x0"].train_key == runs["baseline"].train_key and runs["clip_x0"].key != runs["baseline"].key
    assert len({r.train_key for r in runs.values()}) == 5


def test_timestep_study_crosses_T_with_the_beta_range():
    study = load_study("studies/timestep_ablation.yaml")
    arms = {a.label: a for a in expand_arms(study)}
    # at T=1000 the by_T factor is 1, so the cross has three distinct cells, not four; beside
    # them a parameter-free reference arm (never trained)
    assert set(arms) == {"T1000", "T200-fixed", "T200-scaled", "wiener-T1000"}
    runs = {r.arm.label: r for r in expand(study)}
    assert runs["T1000"].config.diffusion.T == 1000
    assert runs["T200-fixed"].config.diffusion.T == 200
    assert runs["T200-fixed"].config.diffusion.beta_scaling == "none"
    assert runs["T200-scaled"].config.diffusion.beta_scaling == "by_T"
    assert baseline_arm(study, list(arms.values())) == "T1000"
    assert runs["wiener-T1000"].config.model.preset == "gaussian" and runs["wiener-T1000"].config.diffusion.T == 1000


def test_terminal_snr_study_varies_the_schedules_end_and_the_target_on_the_unscaled_T200_schedule():
    study = load_study("studies/terminal_snr.yaml")
    arms = expand_arms(study)
    assert [a.label for a in arms] == ["as_is", "ztsnr_v", "v", "scaled"]
    assert baseline_arm(study, arms) == "as_is"
    assert study.seeds.start >= 3
    by_arm = {r.arm.label: r for r in expand(study) if r.seed == study.seed_list[0]}
    base = by_arm["as_is"].config
    assert base.diffusion.T == 200 and base.diffusion.schedule == "linear" and base.diffusion.beta_scaling == "none"
    assert not base.diffusion.zero_terminal_snr and base.objective.prediction == "eps"
    assert base.data.name == "digits" and base.model.preset == "tiny"
    expected = {
        "ztsnr_v": {"diffusion.zero_terminal_snr", "objective.prediction"},
        "v": {"objective.prediction"},
        "scaled": {"diffusion.beta_scaling"},
    }
    for arm, keys in expected.items():
        assert set(changed_keys(study, by_arm[arm])) == keys, arm
    assert by_arm["ztsnr_v"].config.objective.prediction == "v"
    # every arm trains its own model, and the brightness spread is what the study asks about
    assert len({r.train_key for r in by_arm.values()}) == 4
    assert {h.arm for h in study.hypotheses.values() if h.metric == "brightness_std_gap"} == set(expected) | {"as_is"}


def test_darkening_plan_is_the_baseline_plus_nine_single_changes():
    study = load_study("studies/darkening_diagnosis.yaml")
    arms = expand_arms(study)
    assert arms[0].label == "baseline" and len(arms) == 10
    assert len(study.seeds) >= 3
    by_arm = {r.arm.label: r for r in expand(study) if r.seed == study.seeds[0]}
    base = by_arm["baseline"].config
    assert base.train.ema_decay is None and base.model.time_mlp == "shared" and base.model.preset == "tiny"
    assert base.diffusion.sigma == "beta" and not base.sample.clip_x0 and base.sample.sampler == "ddpm"
    assert base.objective.weighting == "simple" and base.diffusion.schedule == "linear"
    expected = {
        "ema": {"train.ema_decay"},
        "clip_x0": {"sample.clip_x0"},
        "per_block_time_mlp": {"model.time_mlp"},
        "cosine": {"diffusion.schedule"},
        "kept_wt": {"objective.weighting"},
        "l0_term": {"objective.l0_term"},
        "huber": {"objective.loss"},
        "noise_clip": {"objective.noise_clip"},
    }
    for arm, keys in expected.items():
        assert set(changed_keys(study, by_arm[arm])) == keys, arm
    assert by_arm["annotated"].config.model.preset == "annotated"


def test_error_accumulation_trains_twice_and_measures_three_sampling_arms_from_the_baseline():
    study = load_study("studies/error_accumulation.yaml")
    arms = expand_arms(study)
    assert [a.label for a in arms] == ["baseline", "fp64", "eps_scale", "eps_scale_large", "ddpm_ip"]
    assert study.adaptive is not None and study.adaptive.start >= 3
    runs = {r.arm.label: r for r in expand(study) if r.seed == study.seed_list[0]}
    base = runs["baseline"].config
    assert base.data.name == "digits" and base.model.preset == "tiny" and base.diffusion.T == 1000
    assert base.sample.precision == "fp32" and base.sample.eps_scale == 1.0 and base.objective.input_perturbation == 0.0
    expected = {
        "fp64": {"sample.precision": "fp64"},
        "eps_scale": {"sample.eps_scale": 1.005},
        "eps_scale_large": {"sample.eps_scale": 1.05},
        "ddpm_ip": {"objective.input_perturbation": 0.1},
    }
    for arm, changes in expected.items():
        assert changed_keys(study, runs[arm]) == changes, arm
    # sampling-only arms are measured from the baseline's training; DDPM-IP trains its own
    for arm in ("fp64", "eps_scale", "eps_scale_large"):
        assert runs[arm].train_key == runs["baseline"].train_key and runs[arm].key != runs["baseline"].key
    assert runs["ddpm_ip"].train_key != runs["baseline"].train_key
    # the new knobs at their defaults stay out of the keys: the baseline is the other digits
    # studies' baseline run for run, so their finished trainings are found and reused
    ours = {r.seed: r.key for r in expand(study) if r.arm.label == "baseline"}
    objective = {
        r.seed: r.key
        for r in expand(load_study("studies/objective_ablation.yaml"))
        if r.arm.label == "baseline" and r.seed in ours
    }
    assert ours == objective
    # every new measure is asked about, and the log's "1000 steps, in float32"
    claims = {(h.metric, h.arm) for h in study.hypotheses.values()}
    assert {("eps_norm_excess_end", "baseline"), ("chain_std_gap_mean", "baseline")} <= claims
    assert {
        ("final_mean_gap", "fp64"),
        ("eps_norm_excess_end", "eps_scale"),
        ("eps_norm_excess_end", "ddpm_ip"),
    } <= claims


# The run keys of the shipped studies before the lifecycle redesign (computed at commit
# 830ff48): finished results of users must still be found, so a change of a key is a bug.
SHIPPED_KEYS = {
    "capacity_ablation": [
        "1446262385ce",
        "14f620656128",
        "1a2db50dcc2c",
        "3a862c55ff45",
        "c854c394ba74",
        "feae4c37d7ff",
    ],
    "darkening_diagnosis": [
        "03332d5cca4d",
        "06c712e9e366",
        "0a3cc10c7382",
        "0aed89cfa571",
        "0b652d47a33f",
        "10f2948fe77f",
        "17146d1f0e0e",
        "363233f07d6d",
        "44cbaef7005f",
        "5d0307f3c821",
        "66ee3a6f4aa2",
        "70d3afecd82a",
        "791dd12af838",
        "7933c6834860",
        "799b28858a07",
        "86ddad3f7d2b",
        "86ecf4c1aec6",
        "8eb50808f6a7",
        "900e2e390545",
        "98fc29ac7e9f",
        "a69aab749ffa",
        "c4c5e61bce9d",
        "c5e6a1aff651",
        "c79526606f73",
        "d5cfb9b0eff1",
        "e7306ea6407d",
        "edf6947f1225",
        "f35bd9226801",
        "f73960d50b03",
        "f79167895650",
    ],
    "objective_ablation": [
        "06c712e9e366",
        "0a3cc10c7382",
        "0eabc63330d9",
        "2ef71747fb2a",
        "5e2ab9bfd8f4",
        "63926a9e89ec",
        "792b77e39161",
        "d37e1e84f444",
        "dc572a4e90b8",
        "e2dfb92b40cf",
    ],
    "time_embedding_ablation": [
        "06c712e9e366",
        "0a3cc10c7382",
        "1204ad55d4e4",
        "27915fa47044",
        "e0f6b5de6525",
        "edf6947f1225",
    ],
    "timestep_ablation": [
        "04d9f81a89da",
        "06c712e9e366",
        "0a3cc10c7382",
        "0bf024b877be",
        "6477c1bd6ae5",
        "edcf58291545",
    ],
}


@pytest.mark.parametrize("name", sorted(SHIPPED_KEYS))
def test_run_keys_of_shipped_studies_are_unchanged(name):
    """Arms may be added (timestep_ablation gained a reference arm); no existing key changes."""
    study = load_study(STUDY_DIR / f"{name}.yaml")
    assert set(SHIPPED_KEYS[name]) <= {r.key for r in expand(study)}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_studies_state_the_seed_observations_as_hypotheses(path):
    study = load_study(path)
    metrics = {h.metric for h in study.hypotheses.values()}
    assert {"loss_small_minus_mid", "eps_bias_max", "final_mean_gap", "sat_gap"} <= metrics


def test_an_arms_own_level_wins_over_a_baseline_default_whatever_the_axis_order(tmp_path):
    """one_at_a_time: the varied level must win over another axis's baseline level that sets the
    same key, even when the varied axis comes first (it used to lose to the later axis)."""
    path = tmp_path / "order.yaml"
    path.write_text(
        "study: order\nquestion: q\ndesign: one_at_a_time\n"
        "ablations:\n"
        "  capacity:\n    tiny: {model.preset: tiny}\n    wide: {model.base_channels: 32, model.time_mlp: per_block}\n"
        "  time_mlp:\n    shared: {model.time_mlp: shared}\n    per_block: {model.time_mlp: per_block}\n"
        "baseline: {capacity: tiny, time_mlp: shared}\n"
    )
    runs = {r.arm.label: r for r in expand(load_study(path))}
    assert runs["wide"].config.model.time_mlp == "per_block" and runs["wide"].config.model.base_channels == 32
    assert runs["baseline"].config.model.time_mlp == "shared"


def test_a_later_knob_at_its_default_leaves_run_and_train_keys_as_before(monkeypatch):
    """A knob added to the config after keys were recorded (config.later_knob) must not change
    the key of a config that leaves it at its default, and must change it when set."""
    from pydantic import create_model

    from ddpm_engine import config as engine_config
    from harness.study.plan import run_key, train_key

    before = engine_config.ExperimentConfig()
    keys = run_key(before, 0), train_key(before, 0)
    # the same config with one more train knob, as an upgrade would add it
    Train = create_model(
        "TrainWithKnob", __base__=engine_config.TrainConfig, new_knob=(float, engine_config.later_knob(0.0))
    )
    Experiment = create_model("ExperimentWithKnob", __base__=engine_config.ExperimentConfig, train=(Train, Train()))
    assert run_key(Experiment(), 0) == keys[0]
    assert run_key(Experiment(train={"new_knob": 0.0}), 0) == keys[0]
    assert train_key(Experiment(), 0) == keys[1]
    assert Experiment().training_dict() == before.training_dict()
    assert run_key(Experiment(train={"new_knob": 0.5}), 0) != keys[0]
    assert "new_knob" in Experiment(train={"new_knob": 0.5}).training_dict()["train"]
    # a field that is not a later knob is in the key whatever its value
    assert "steps" in before.key_dict()["train"]


# ---------------------------------------------------------------- the research log's studies (issue 23)


def first_seed_runs(name: str) -> dict:
    study = load_study(STUDY_DIR / f"{name}.yaml")
    assert study.adaptive is not None and study.adaptive.start >= 3
    return {r.arm.label: r for r in expand(study) if r.seed == study.seed_list[0]}


def test_capacity_ladder_differs_only_in_width_at_about_0_1_0_5_and_2M_with_8M_defined_for_gpus():
    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.model import build_model, count_parameters
    from harness.study.spec import apply_overrides

    study = load_study(STUDY_DIR / "capacity_ladder.yaml")
    runs = first_seed_runs("capacity_ladder")
    assert list(runs) == ["w8", "w24", "w48"] and baseline_arm(study, expand_arms(study)) == "w24"

    def params(config) -> int:
        return count_parameters(build_model(config.model, 1, 8))

    sizes = {arm: params(run.config) for arm, run in runs.items()}
    assert 0.08e6 < sizes["w8"] < 0.15e6 and 0.4e6 < sizes["w24"] < 0.6e6 and 1.5e6 < sizes["w48"] < 2.5e6
    gpu_rung = ExperimentConfig.from_dict(apply_overrides(study.base, study.ablations["width"]["w104"]))
    assert 6.5e6 < params(gpu_rung) < 9.5e6
    for arm, run in runs.items():  # the same time embedding, steps and everything else
        assert set(changed_keys(study, run)) <= {"model.base_channels"}, arm
        model = run.config.model
        assert (model.time_mlp, model.time_embed_dim, tuple(model.channel_mults)) == ("shared", 192, (1, 2, 2))
    assert len({r.config.train.model_dump_json() for r in runs.values()}) == 1


def test_dataset_size_caps_the_digits_and_judges_quality_on_all_of_them():
    runs = first_seed_runs("dataset_size")
    assert {arm: r.config.data.max_images for arm, r in runs.items()} == {
        "n100": 100,
        "n300": 300,
        "n1000": 1000,
        "all": None,
    }
    assert {r.config.eval.quality_reference for r in runs.values()} == {"uncapped"}
    assert len({r.config.train.model_dump_json() for r in runs.values()}) == 1  # equal steps
    metrics = {h.metric for h in load_study(STUDY_DIR / "dataset_size.yaml").hypotheses.values()}
    assert {"heldout_loss", "fd", "coverage", "memorised_frac"} <= metrics


def test_small_t_specialist_trains_on_t_1_to_10_beside_the_generalist_and_two_references():
    runs = first_seed_runs("small_t_specialist")
    assert list(runs) == ["generalist", "specialist", "pixelwise", "median"]
    assert runs["generalist"].config.train.t_range is None
    assert runs["specialist"].config.train.t_range == (1, 10)
    assert set(changed_keys(load_study(STUDY_DIR / "small_t_specialist.yaml"), runs["specialist"])) == {"train.t_range"}
    assert runs["pixelwise"].config.model.preset == "pixelwise" and runs["median"].config.model.preset == "median"
    # the generalist is timestep_ablation's T1000 run: found there, not trained again
    assert runs["generalist"].key in SHIPPED_KEYS["timestep_ablation"]


def test_sampling_steps_arms_share_one_training_per_seed():
    runs = first_seed_runs("sampling_steps")
    samplers = {arm: (r.config.sample.sampler, r.config.sample.steps) for arm, r in runs.items()}
    assert samplers == {
        "ancestral": ("ddpm", None),
        "ddim250": ("ddim", 250),
        "ddim50": ("ddim", 50),
        "ddim10": ("ddim", 10),
    }
    assert len({r.train_key for r in runs.values()}) == 1 and len({r.key for r in runs.values()}) == 4
    assert runs["ancestral"].key in SHIPPED_KEYS["timestep_ablation"]  # trained there already
    study = load_study(STUDY_DIR / "sampling_steps.yaml")
    assert len({r.train_key for r in expand(study)}) == len(study.seed_list)  # one training per seed


def test_plan_says_the_sampling_arms_are_measured_only(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from harness import cli
    from harness.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.console, "width", 200)  # one line per arm: a wrapped cell splits the words
    result = CliRunner().invoke(app, ["plan", str(STUDY_DIR / "sampling_steps.yaml"), "--no-measure", "--no-check"])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert out.count("(+8 measured only)") == 3 and "8 to train" in out and "24 to measure" in out
