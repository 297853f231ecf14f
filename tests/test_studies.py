"""The shipped studies validate, expand as their questions say, and run on the default data."""

from pathlib import Path

import pytest

from harness.plan import baseline_arm, changed_keys, expand, expand_arms
from harness.spec import load_study

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
    from harness.plan import run_key, train_key

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
