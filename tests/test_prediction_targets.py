"""objective.prediction (eps | x0 | v) and diffusion.zero_terminal_snr, against their definitions.

Each target is checked by a model that outputs it exactly (it knows x_0 and eps): what it
predicts converts back to the true eps and x_0, its loss is 0, and probes, the bound, the
samplers and the sampler check read it as the same denoiser whatever the target.
"""

import math

import pydantic
import pytest
import torch

from ddpm_engine import ExperimentConfig, MemoryRecorder, run_experiment
from ddpm_engine.config import DiffusionConfig, ObjectiveConfig
from ddpm_engine.data import load_data
from ddpm_engine.diagnostics import per_t_probe
from ddpm_engine.diffusion import (
    normal_kl,
    predicted_eps,
    predicted_x0,
    q_posterior,
    q_sample,
    training_target,
    v_target,
    vlb_term_bits,
)
from ddpm_engine.model import build_model
from ddpm_engine.objectives import Objective, min_snr_weights
from ddpm_engine.references import REFERENCES, build_reference
from ddpm_engine.sampler_check import check_sampler, fit_gaussian
from ddpm_engine.sampling import sample
from ddpm_engine.schedule import Schedule, linear_betas, make_schedule, zero_terminal_snr_betas
from ddpm_engine.training import Trainer

TARGETS = ("eps", "x0", "v")
ZERO_SNR = make_schedule(DiffusionConfig(T=200, zero_terminal_snr=True))
PLAIN = make_schedule(DiffusionConfig(T=200))


class Oracle(torch.nn.Module):
    """Outputs the exact target for x_t = q_sample(x0, t, eps) of the x0 it was given: it
    recovers eps from x_t by eq. 4 in float64 (finite at every t of these schedules since
    1 - alphabar_t > 0)."""

    def __init__(self, schedule: Schedule, x0: torch.Tensor, prediction: str):
        super().__init__()
        self.tables, self.x0, self.prediction = schedule.on("cpu", torch.float64), x0.double(), prediction

    def forward(self, xt, t):
        abar = self.tables["alphabar"][t - 1].view(-1, 1, 1, 1)
        eps = (xt.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return training_target(self.tables, self.x0, t, eps, self.prediction).float()


def _draw(n=6, side=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, side, side, generator=gen, dtype=torch.float64) * 2 - 1
    return x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64)


# ---- the schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [DiffusionConfig(T=200), DiffusionConfig(T=1000), DiffusionConfig(T=50, schedule="cosine")],
    ids=["linear-200", "linear-1000", "cosine-50"],
)
def test_zero_terminal_snr_ends_at_zero_keeps_the_first_and_is_affine_in_sqrt_alphabar(config):
    original = make_schedule(config)
    rescaled = make_schedule(config.model_copy(update={"zero_terminal_snr": True}))
    assert float(rescaled.alphabar[-1]) == 0.0 and float(rescaled.betas[-1]) == 1.0
    assert float(original.alphabar[-1]) > 0.0  # what the knob changes
    assert float(rescaled.alphabar[0]) == pytest.approx(float(original.alphabar[0]), rel=1e-12)
    # Lin et al. 2023 Alg. 1: sqrt(abar') = (sqrt(abar) - s_T) s_1 / (s_1 - s_T), an affine map
    s, r = original.alphabar.sqrt(), rescaled.alphabar.sqrt()
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-12)
    assert bool((rescaled.alphabar[1:] < rescaled.alphabar[:-1]).all())  # still a noising process


def test_zero_terminal_snr_leaves_the_default_schedule_alone_and_needs_a_target_that_gives_x0():
    default = DiffusionConfig(T=200)
    assert default.zero_terminal_snr is False
    assert torch.equal(make_schedule(default).betas, linear_betas(200, 1e-4, 0.02))
    assert ExperimentConfig().objective.prediction == "eps"
    with pytest.raises(pydantic.ValidationError, match="prediction eps with diffusion.zero_terminal_snr"):
        ExperimentConfig.from_dict({"diffusion": {"zero_terminal_snr": True}})
    for target in ("v", "x0"):
        ExperimentConfig.from_dict({"diffusion": {"zero_terminal_snr": True}, "objective": {"prediction": target}})
    with pytest.raises(pydantic.ValidationError):
        ObjectiveConfig(prediction="score")
    # later knobs: out of the run key at their default, in it otherwise
    plain = ExperimentConfig()
    assert (
        "zero_terminal_snr" not in plain.key_dict()["diffusion"] and "prediction" not in plain.key_dict()["objective"]
    )
    v = ExperimentConfig.from_dict({"objective": {"prediction": "v"}})
    assert v.key_dict()["objective"]["prediction"] == "v"


def test_a_beta_of_one_is_only_allowed_at_t_equals_T():
    Schedule(zero_terminal_snr_betas(linear_betas(10, 1e-4, 0.02)))
    betas = linear_betas(10, 1e-4, 0.02)
    betas[4] = 1.0
    with pytest.raises(ValueError, match=r"beta_T in \(0, 1\]"):
        Schedule(betas)


def test_every_per_t_table_stays_finite_at_zero_terminal_snr_where_it_can():
    s = ZERO_SNR
    for table in (s.posterior_variance, s.posterior_log_variance_clipped, s.posterior_mean_coef_x0):
        assert bool(torch.isfinite(table).all())
    assert float(s.posterior_mean_coef_xt[-1]) == 0.0  # alpha_T = 0: x_{T-1} forgets x_T
    assert float(s.snr()[-1]) == 0.0
    for sigma in ("beta", "beta_tilde"):
        assert bool(torch.isfinite(s.reverse_variance(sigma)).all())
        for target in ("x0", "v"):
            assert bool(torch.isfinite(s.vlb_weights(sigma, target)).all()), (sigma, target)
        # eps carries nothing of x_0 at t = T: its weight there is infinite, and config refuses it
        assert math.isinf(float(s.vlb_weights(sigma, "eps")[-1]))


# ---- conversions ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [PLAIN, ZERO_SNR], ids=["plain", "zero-snr"])
@pytest.mark.parametrize("prediction", TARGETS)
def test_the_exact_target_converts_back_to_the_true_eps_and_x0(schedule, prediction):
    tables = schedule.on("cpu", torch.float64)
    x0, eps = _draw(n=5)
    t = torch.tensor([1, 2, 100, schedule.T - 1, schedule.T])
    xt = q_sample(tables, x0, t, eps)
    output = training_target(tables, x0, t, eps, prediction)
    torch.testing.assert_close(predicted_eps(tables, xt, t, output, prediction), eps, rtol=0, atol=1e-9)
    x0_hat = predicted_x0(tables, xt, t, output, prediction)
    if prediction == "eps" and schedule is ZERO_SNR:  # the one combination config refuses
        assert not bool(torch.isfinite(x0_hat[-1]).all())
        x0_hat, x0 = x0_hat[:-1], x0[:-1]
    # from eps, x_0 divides by sqrt(alphabar_t): float64 round-off grows as 1/sqrt(alphabar)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)


def test_v_is_salimans_and_hos_definition():
    tables = ZERO_SNR.on("cpu", torch.float64)
    x0, eps = _draw(n=3)
    t = torch.tensor([1, 50, 200])
    abar = ZERO_SNR.alphabar[t - 1].view(-1, 1, 1, 1)
    torch.testing.assert_close(v_target(tables, x0, t, eps), abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    assert torch.equal(v_target(tables, x0, t, eps)[-1], -x0[-1])  # at alphabar_T = 0, v = -x_0
    assert training_target(tables, x0, t, eps, "eps") is eps


# ---- the loss ---------------------------------------------------------------------------------


def _objective(schedule, **config):
    return Objective(ObjectiveConfig(**config), schedule, "beta", 17, "cpu")


@pytest.mark.parametrize("weighting", [{}, {"weighting": "vlb"}, {"min_snr_gamma": 5.0}, {"loss": "huber"}])
@pytest.mark.parametrize("prediction", TARGETS)
def test_the_exact_target_has_zero_loss_and_a_wrong_one_does_not(prediction, weighting):
    schedule = PLAIN if prediction == "eps" else ZERO_SNR
    x0, eps = _draw(n=8)
    x0, eps = x0.float(), eps.float()
    t = torch.tensor([1, 2, 10, 50, 100, 150, 199, 200])
    objective = _objective(schedule, prediction=prediction, **weighting)
    rows = objective.row_losses(Oracle(schedule, x0, prediction), x0, t, eps)
    assert rows.abs().max() < 1e-6, rows
    # the same oracle read as another target is wrong (in every row the weighting keeps)
    other = "eps" if prediction == "x0" else "x0"  # v is close to eps at small t
    wrong = objective.row_losses(Oracle(schedule, x0, other), x0, t, eps)
    kept = objective.t_weights[t - 1] > 0
    assert bool(torch.isfinite(wrong).all()) and bool((wrong[kept] / objective.t_weights[t - 1][kept] > 1e-3).all())


def test_min_snr_weights_follow_hang_et_al_and_stay_finite_at_zero_snr():
    snr = ZERO_SNR.snr()
    gamma = 5.0
    positive = snr > 0
    expected = {
        "eps": snr.clamp(max=gamma) / snr,
        "x0": snr.clamp(max=gamma),
        "v": snr.clamp(max=gamma) / (snr + 1),
    }
    for target, formula in expected.items():
        weights = min_snr_weights(snr, gamma, target)
        assert bool(torch.isfinite(weights).all()), target
        torch.testing.assert_close(weights[positive], formula[positive], rtol=1e-12, atol=0)
    # at SNR = 0: the eps form's limit, and the x0 and v forms' own value
    assert float(min_snr_weights(snr, gamma, "eps")[-1]) == 1.0
    assert float(min_snr_weights(snr, gamma, "x0")[-1]) == 0.0 == float(min_snr_weights(snr, gamma, "v")[-1])
    # the eps weights of every schedule that never reaches SNR 0 are the earlier formula's, bit for bit
    plain = PLAIN.snr()
    assert torch.equal(min_snr_weights(plain, gamma, "eps"), plain.clamp(max=gamma) / plain)
    rows = _objective(ZERO_SNR, prediction="v", min_snr_gamma=gamma).t_weights
    assert bool(torch.isfinite(rows).all())


@pytest.mark.parametrize("schedule", [PLAIN, ZERO_SNR], ids=["plain", "zero-snr"])
@pytest.mark.parametrize("prediction", TARGETS)
def test_vlb_weights_are_the_bound_per_squared_error_of_each_target(schedule, prediction):
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with the model's fixed variance grows by exactly
    w_t x the mean squared error of the target (in nats per dimension) when the output moves
    off the exact target: the weights of Schedule.vlb_weights are those of the bound."""
    if prediction == "eps" and schedule is ZERO_SNR:
        pytest.skip("config refuses eps at zero terminal SNR")
    tables = schedule.on("cpu", torch.float64)
    sigma2 = schedule.reverse_variance("beta")
    x0, eps = _draw(n=6)
    t = torch.tensor([2, 3, 20, 100, 199, 200])
    xt = q_sample(tables, x0, t, eps)
    exact = training_target(tables, x0, t, eps, prediction)
    error = 0.01 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    true_mean, _, true_logvar = q_posterior(tables, x0, xt, t)
    logvar = sigma2.log()[t - 1].view(-1, 1, 1, 1).expand_as(xt)

    def kl(output):
        mean = q_posterior(tables, predicted_x0(tables, xt, t, output, prediction), xt, t)[0]
        return normal_kl(true_mean, true_logvar.expand_as(xt), mean, logvar).flatten(1).mean(1)

    weights = schedule.vlb_weights("beta", prediction)[t - 1]
    torch.testing.assert_close(
        kl(exact + error) - kl(exact), weights * (error**2).flatten(1).mean(1), rtol=1e-6, atol=0
    )
    # the bound's own L_{t-1} of the exact target is the KL of the posterior against itself
    bits = vlb_term_bits(tables, x0, xt, t, exact, sigma2.log(), 17, prediction=prediction)
    torch.testing.assert_close(bits, kl(exact) / math.log(2.0), rtol=1e-6, atol=1e-9)


# ---- probes, samplers and the sampler check read every target as the same denoiser --------------


@pytest.fixture(scope="module")
def digits():
    from ddpm_engine.config import DataConfig

    data = load_data(DataConfig())
    return data.to_model_space(data.train).float(), data.to_model_space(data.heldout[:32]).float(), data.levels


def test_a_denoiser_gives_the_same_probe_in_every_target(digits):
    train, held, levels = digits
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(0))
    grid = [1, 2, 50, 150, 199, 200]
    frames = {}
    for schedule, targets in ((PLAIN, TARGETS), (ZERO_SNR, ("x0", "v"))):
        for target in targets:
            reference = build_reference("gaussian", schedule, train, levels, target)
            frames[schedule is ZERO_SNR, target] = per_t_probe(
                reference, schedule, held, noise, grid, sigma="beta", levels=levels, prediction=target
            )
    columns = ["loss_mse", "eps_pred_mean", "eps_pred_std", "err_mean", "vlb_bits"]
    for zero_snr, target in frames:
        frame, same = frames[zero_snr, target], frames[zero_snr, "v"]
        assert frame[columns].notna().all().all() and (frame[columns].abs() < math.inf).all().all()
        # float32 round trips of the output: eps-hat agrees to 1e-5 of its own scale
        for column in columns:
            assert (frame[column] - same[column]).abs().max() < 2e-4 * (1 + same[column].abs().max()), column
    # at alphabar_T = 0, eps-hat is x_T itself, which is eps: the loss there is 0
    assert frames[True, "v"].set_index("t").loc[200, "loss_mse"] < 1e-10


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_draw_the_same_samples_from_every_target(digits, sampler):
    train, _, levels = digits
    runs = {}
    for schedule, targets in ((PLAIN, TARGETS), (ZERO_SNR, ("x0", "v"))):
        for target in targets:
            reference = build_reference("gaussian", schedule, train, levels, target)
            runs[schedule is ZERO_SNR, target] = sample(
                reference,
                schedule,
                (16, 1, 8, 8),
                generator=torch.Generator().manual_seed(3),
                device=torch.device("cpu"),
                sampler=sampler,
                ddim_steps=20,
                prediction=target,
            )
    for (zero_snr, _target), x in runs.items():
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(x, runs[zero_snr, "v"], rtol=0, atol=2e-3)
    # the schedule matters: the two schedules' samples differ
    assert (runs[False, "v"] - runs[True, "v"]).abs().max() > 0.05


def test_sampler_check_reads_every_target_as_the_same_chain_and_refuses_eps_at_zero_snr(digits):
    train, _, _ = digits
    mu, cov, _ = fit_gaussian(train)
    for sampler in ("ddpm", "ddim"):
        plain = {target: check_sampler(PLAIN, mu, cov, sampler=sampler, prediction=target) for target in TARGETS}
        for target in ("x0", "v"):
            for gap in ("prior_mean_gap", "max_mean_gap", "max_std_gap", "final_mean_gap", "final_std_gap"):
                assert plain[target][gap] == pytest.approx(plain["eps"][gap], rel=1e-6, abs=1e-9), (sampler, gap)
        for target in ("x0", "v"):
            zero = check_sampler(ZERO_SNR, mu, cov, sampler=sampler, prediction=target)
            # q(x_T) is N(0, I) itself: no prior gap, and the chain reaches the data
            assert zero["prior_mean_gap"] == 0.0
            assert zero["final_mean_gap"] < 0.01 and zero["final_std_gap"] < 0.02
        assert plain["eps"]["prior_mean_gap"] > 0.1  # alphabar_T = 0.13 leaves the image in x_T
        with pytest.raises(ValueError, match="zero terminal SNR"):
            check_sampler(ZERO_SNR, mu, cov, sampler=sampler, prediction="eps")


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_references_stay_finite_at_zero_terminal_snr_and_answer_in_their_target(digits, name):
    train, held, levels = digits
    t = torch.tensor([1, 100, 200] * 4)[: len(held[:12])]
    xt = q_sample(ZERO_SNR.on("cpu"), held[:12], t, torch.randn(held[:12].shape))
    outputs = {target: build_reference(name, ZERO_SNR, train, levels, target)(xt, t) for target in TARGETS}
    tables = ZERO_SNR.on("cpu")
    for target in ("x0", "v"):
        assert bool(torch.isfinite(outputs[target]).all())
        torch.testing.assert_close(
            predicted_eps(tables, xt, t, outputs[target], target), outputs["eps"], rtol=0, atol=1e-3
        )
    at_T = t == 200
    torch.testing.assert_close(outputs["eps"][at_T], xt[at_T])  # no signal: eps-hat is x_T


# ---- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", TARGETS)
def test_a_short_training_lowers_the_probe_loss_of_every_target(digits, prediction):
    train, held, levels = digits
    config = ExperimentConfig.from_dict(
        {
            "model": {"preset": "tiny", "base_channels": 8, "channel_mults": [1, 2], "time_embed_dim": 16},
            "diffusion": {"T": 50, "zero_terminal_snr": prediction != "eps"},
            "objective": {"prediction": prediction},
            "train": {"batch_size": 32, "warmup_steps": 5, "lr": 2e-3},
        }
    )
    schedule = make_schedule(config.diffusion)
    torch.manual_seed(0)
    model = build_model(config.model, 1, 8)
    trainer = Trainer(config, model, schedule, train, levels, torch.device("cpu"))
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(0))
    # mid t, where 30 steps already teach every target; at t = 1 the noise is hardly learnt yet
    grid = [10, 25, 40]

    def probe():
        return per_t_probe(
            trainer.model, schedule, held, noise, grid, sigma="beta", levels=levels, prediction=prediction
        )

    before = probe()
    for _ in range(30):
        trainer.train_step()
    after = probe()
    assert after["loss_mse"].mean() < 0.85 * before["loss_mse"].mean(), (before["loss_mse"], after["loss_mse"])
    assert after[["loss_mse", "vlb_bits"]].notna().all().all()


def test_a_run_at_zero_terminal_snr_with_v_is_finite_end_to_end():
    config = ExperimentConfig.from_dict(
        {
            "model": {"preset": "tiny", "base_channels": 8, "channel_mults": [1, 2], "time_embed_dim": 16},
            "diffusion": {"T": 30, "zero_terminal_snr": True},
            "objective": {"prediction": "v", "weighting": "vlb", "l0_term": True},
            "train": {"steps": 10, "batch_size": 16, "log_every": 5, "warmup_steps": 2},
            "sample": {"num_samples": 8, "sampler": "ddim", "steps": 10},
            "eval": {"probe_every": 10, "probe_images": 16, "quality": False, "drift_hist_steps": 3},
        }
    )
    result = run_experiment(config, MemoryRecorder(), device="cpu")
    summary = result.summary
    for name in ("bpd", "diffusion_bits", "heldout_loss", "final_loss", "final_mean_gap", "own_final_mean_gap"):
        assert math.isfinite(summary[name]), name
    assert summary["prior_bits"] == 0.0  # q(x_T | x_0) is N(0, I) itself
    # the two chains start from the same x_T: the start's share is nothing
    assert summary["start_prior_mean_gap"] == 0.0 and summary["start_final_mean_gap"] == 0.0
    per_t = result.tables["per_t"]
    assert per_t[["loss_mse", "vlb_bits", "wt", "loss_best_ref"]].notna().all().all()
    assert bool((per_t[["vlb_bits", "wt"]].abs() < math.inf).all().all())


def test_the_exposure_bias_measures_read_every_target_as_the_same_predicted_noise(digits):
    # one exact denoiser answering in three targets: the predicted noise's RMS on forward states
    # and on the chain must be the same numbers (a raw v or x0 output would be far off: at
    # alphabar_T = 0.13 v-hat is mostly -x_0, x0-hat the data)
    from ddpm_engine.diagnostics import eps_rms, forward_eps_rms
    from ddpm_engine.experiment import observed_eps
    from ddpm_engine.sampling import SAMPLERS, chunked_eps

    train, held, levels = digits
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(1))
    forward, chain = {}, {}
    for target in TARGETS:
        reference = build_reference("gaussian", PLAIN, train, levels, target)
        forward[target] = forward_eps_rms(reference, PLAIN, held, noise, [1, 100, 200], prediction=target)["q_eps_rms"]
        seen: list[float] = []
        denoiser = observed_eps(
            chunked_eps(reference),
            lambda t, x, eps, seen=seen: seen.append(float(eps_rms(eps))),
            PLAIN.on("cpu"),
            target,
        )
        generator = torch.Generator().manual_seed(3)
        x_T = torch.randn((16, 1, 8, 8), generator=generator)
        SAMPLERS["ddim"](denoiser, x_T, PLAIN, generator=generator, steps=10, prediction=target)
        chain[target] = torch.tensor(seen)
    for target in ("x0", "v"):
        torch.testing.assert_close(
            torch.tensor(forward[target].values), torch.tensor(forward["eps"].values), rtol=2e-4, atol=0
        )
        torch.testing.assert_close(chain[target], chain["eps"], rtol=2e-3, atol=0)
    assert 0.5 < float(forward["eps"].iloc[-1]) < 1.5  # eps-hat at t = T is about unit RMS


def test_epsilon_scaling_needs_an_eps_model():
    ExperimentConfig.from_dict({"sample": {"eps_scale": 1.01}})
    ExperimentConfig.from_dict({"objective": {"prediction": "v"}})
    with pytest.raises(pydantic.ValidationError, match="sample.eps_scale 1.01 needs objective.prediction eps"):
        ExperimentConfig.from_dict({"objective": {"prediction": "v"}, "sample": {"eps_scale": 1.01}})
    from ddpm_engine.sampler_check import check_sampler

    mu, cov = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="needs prediction eps"):
        check_sampler(PLAIN, mu, cov, eps_scale=1.01, prediction="v")
