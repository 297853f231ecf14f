"""The shipped studies validate, expand as their questions say, and run on the default data."""

from pathlib import Path

import pytest

from harness.plan import baseline_arm, changed_keys, expand, expand_arms
from harness.spec import load_study

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))


def test_every_question_of_the_seed_research_has_a_study():
    names = {p.stem for p in STUDIES}
    assert {"timestep_ablation", "capacity_ablation", "time_embedding_ablation", "objective_ablation",
            "darkening_diagnosis"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_validates_and_runs_on_digits(path):
    study = load_study(path)
    runs = expand(study)
    assert runs and len({r.key for r in runs}) == len(runs)
    assert all(r.config.data.name == "digits" for r in runs)
    assert study.question.strip()


def test_timestep_study_crosses_T_with_the_beta_range():
    study = load_study("studies/timestep_ablation.yaml")
    arms = {a.label: a for a in expand_arms(study)}
    # at T=1000 the by_T factor is 1, so the cross has three distinct cells, not four
    assert set(arms) == {"T1000", "T200-fixed", "T200-scaled"}
    runs = {r.arm.label: r for r in expand(study)}
    assert runs["T1000"].config.diffusion.T == 1000
    assert runs["T200-fixed"].config.diffusion.T == 200
    assert runs["T200-fixed"].config.diffusion.beta_scaling == "none"
    assert runs["T200-scaled"].config.diffusion.beta_scaling == "by_T"
    assert baseline_arm(study, list(arms.values())) == "T1000"


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
        "ema": {"train.ema_decay"}, "clip_x0": {"sample.clip_x0"}, "per_block_time_mlp": {"model.time_mlp"},
        "cosine": {"diffusion.schedule"}, "kept_wt": {"objective.weighting"}, "l0_term": {"objective.l0_term"},
        "huber": {"objective.loss"}, "noise_clip": {"objective.noise_clip"},
    }
    for arm, keys in expected.items():
        assert set(changed_keys(study, by_arm[arm])) == keys, arm
    assert by_arm["annotated"].config.model.preset == "annotated"
