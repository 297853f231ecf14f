"""Objective knobs and diagnostics helpers, checked against their definitions."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from ddpm_engine.config import DiffusionConfig, ObjectiveConfig
from ddpm_engine.diagnostics import probe_timesteps, trapezoid_sum, wasserstein1
from ddpm_engine.diffusion import q_sample
from ddpm_engine.objectives import Objective, TimestepSampler, gaussian_noise
from ddpm_engine.schedule import make_schedule

SCHEDULE = make_schedule(DiffusionConfig(T=100))


class ConstantPredictor(torch.nn.Module):
    """Predicts eps = c everywhere, so every loss has a closed form."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return torch.full_like(x, self.c)


def rows(config: dict, t: torch.Tensor, eps: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    objective = Objective(ObjectiveConfig(**config), SCHEDULE, "beta", 17, "cpu")
    x0 = torch.zeros_like(eps)
    return objective.row_losses(ConstantPredictor(c), x0, t, eps)


def test_simple_vlb_and_min_snr_weights():
    t = torch.tensor([1, 10, 50, 100])
    eps = torch.zeros(4, 1, 2, 2)
    simple = rows({}, t, eps)
    torch.testing.assert_close(simple, torch.full((4,), 0.25))  # (0.5 - 0)^2
    vlb = rows({"weighting": "vlb"}, t, eps)
    torch.testing.assert_close(vlb, 0.25 * SCHEDULE.vlb_weights("beta")[t - 1].float())
    snr = SCHEDULE.snr()[t - 1]
    min_snr = rows({"min_snr_gamma": 5.0}, t, eps)
    torch.testing.assert_close(min_snr, 0.25 * (snr.clamp(max=5.0) / snr).float())


def test_huber_is_half_squared_error_inside_delta_and_linear_outside():
    t = torch.tensor([5, 5])
    eps = torch.zeros(2, 1, 2, 2)
    inside = rows({"loss": "huber", "huber_delta": 1.0}, t, eps, c=0.5)
    torch.testing.assert_close(inside, torch.full((2,), 0.125))
    outside = rows({"loss": "huber", "huber_delta": 1.0}, t, eps, c=3.0)
    torch.testing.assert_close(outside, torch.full((2,), 1.0 * (3.0 - 0.5)))


def test_l0_term_replaces_only_rows_at_t1():
    t = torch.tensor([1, 2])
    eps = torch.zeros(2, 1, 2, 2)
    # predicting eps = 10 moves the decoder mean 0.1 away: two bins off at sigma_1 = 0.01
    plain = rows({}, t, eps, c=10.0)
    with_l0 = rows({"l0_term": True}, t, eps, c=10.0)
    assert with_l0[1] == plain[1]
    assert with_l0[0] != plain[0] and with_l0[0] > 5
    # a prediction that keeps the mean inside the right bin costs almost nothing
    assert rows({"l0_term": True}, t, eps, c=0.5)[0] < 1e-6


def test_importance_sampler_is_uniform_until_warm_then_unbiased():
    sampler = TimestepSampler(10, "importance", history=2, device="cpu")
    gen = torch.Generator().manual_seed(0)
    t, w = sampler.sample(64, gen)
    assert torch.all(w == 1.0)
    losses = torch.arange(1, 11, dtype=torch.float32)  # loss grows with t
    for _ in range(2):
        all_t = torch.arange(1, 11)
        sampler.update(all_t, losses[all_t - 1])
    p = sampler.probabilities()
    assert p[-1] > p[0] and float(p.sum()) == pytest.approx(1.0)
    # E_p[w_t L_t] = (1/T) sum_t L_t: importance weights keep the loss unbiased
    t, w = sampler.sample(200_000, gen)
    estimate = float((w * losses[t - 1]).mean())
    assert estimate == pytest.approx(float(losses.mean()), rel=0.02)


def test_noise_clip_bounds_the_noise():
    gen = torch.Generator().manual_seed(1)
    eps = gaussian_noise((10_000,), gen, "cpu", clip=1.5)
    assert float(eps.abs().max()) <= 1.5 and float(eps.abs().max()) > 1.4


def test_probe_grid_and_interpolated_sum():
    assert probe_timesteps(200, 10) == list(range(1, 201))
    grid = probe_timesteps(1000, 40)
    assert grid[0] == 1 and grid[1] == 2 and grid[-1] == 1000 and grid == sorted(set(grid))
    ts = np.array(grid)
    assert trapezoid_sum(ts, ts.astype(float), 1, 1000) == pytest.approx(1000 * 1001 / 2)


def test_wasserstein1_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 500), rng.normal(0.3, 1.2, 700)
    assert wasserstein1(torch.tensor(a), torch.tensor(b)) == pytest.approx(
        scipy.stats.wasserstein_distance(a, b), rel=1e-5
    )
    assert math.isclose(wasserstein1(torch.tensor(a), torch.tensor(a)), 0.0, abs_tol=1e-12)


def test_importance_history_keeps_one_entry_per_occurrence():
    """A t drawn several times in one batch fills as many history slots (the last `history`
    of them), and the warm-up ends exactly when every slot of every t is filled."""
    sampler = TimestepSampler(T=3, kind="importance", history=3, device="cpu")
    sampler.update(torch.tensor([2, 2, 2, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert sampler.losses[1].tolist() == [1.0, 2.0, 3.0] and sampler.counts.tolist() == [1, 3, 0]
    assert sampler.losses[0].tolist() == [4.0, 0.0, 0.0]
    sampler.update(torch.tensor([2]), torch.tensor([5.0]))  # the ring wraps: the oldest entry goes
    assert sampler.losses[1].tolist() == [5.0, 2.0, 3.0]
    sampler.update(torch.tensor([3, 3, 3, 3, 3]), torch.tensor([6.0, 7.0, 8.0, 9.0, 10.0]))
    assert sorted(sampler.losses[2].tolist()) == [8.0, 9.0, 10.0]  # the last three of five
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(sampler.probabilities(), uniform)  # t = 1 has one entry of three: still warming up
    sampler.update(torch.tensor([1, 1]), torch.tensor([4.0, 4.0]))
    rms = sampler.losses.pow(2).mean(dim=1).sqrt()
    ideal = rms / rms.sum()
    expected = ideal * (1 - sampler.uniform_mix) + uniform * sampler.uniform_mix
    assert torch.allclose(sampler.probabilities(), expected)


def test_uniform_sampler_without_a_range_draws_as_before():
    """t_range None is the sampler as it was: the same draws from the same generator state."""
    drawn, _ = TimestepSampler(100, "uniform", history=2, device="cpu").sample(1000, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(1, 101, (1000,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("kind", ["uniform", "importance"])
def test_a_t_range_draws_only_its_t_and_keeps_the_loss_unbiased_over_them(kind):
    """train.t_range [lo, hi]: every t drawn lies in lo..hi, each of them is drawn, and the
    weighted loss estimates the mean loss over the range, as uniform drawing on it would."""
    lo, hi = 3, 7
    sampler = TimestepSampler(10, kind, history=2, device="cpu", t_range=(lo, hi))
    gen = torch.Generator().manual_seed(0)
    losses = torch.arange(1, 11, dtype=torch.float32) ** 2  # grows with t: importance is far from uniform
    for _ in range(2):  # fill the range's histories: importance sampling leaves its warm-up
        in_range = torch.arange(lo, hi + 1)
        sampler.update(in_range, losses[in_range - 1])
    p = sampler.probabilities()
    assert float(p.sum()) == pytest.approx(1.0)
    assert torch.all(p[: lo - 1] == 0) and torch.all(p[hi:] == 0)
    if kind == "importance":
        assert p[hi - 1] > 2 * p[lo - 1]  # weighted by the losses, not uniform
    t, w = sampler.sample(200_000, gen)
    assert int(t.min()) == lo and int(t.max()) == hi and set(t.tolist()) == set(range(lo, hi + 1))
    estimate = float((w * losses[t - 1]).mean())
    assert estimate == pytest.approx(float(losses[lo - 1 : hi].mean()), rel=0.02)


def test_a_t_range_outside_1_to_T_is_refused():
    for t_range in [(0, 5), (5, 11), (6, 5)]:
        with pytest.raises(ValueError, match="1 <= lo <= hi <= T = 10"):
            TimestepSampler(10, "uniform", history=2, device="cpu", t_range=t_range)


# --- DDPM-IP: input perturbation (Ning et al. 2023) -------------------------------------------------


class InputRecorder(torch.nn.Module):
    """Records the network input of every call and predicts eps = c (a closed-form loss)."""

    def __init__(self, c: float = 0.5):
        super().__init__()
        self.c, self.inputs = c, []
        self.weight = torch.nn.Parameter(torch.zeros(()))  # something for an optimizer to step

    def forward(self, x, t):
        self.inputs.append(x.detach().clone())
        return torch.full_like(x, self.c) + 0 * self.weight


def test_input_perturbation_moves_the_input_by_sqrt_one_minus_abar_gamma_xi_and_keeps_the_target():
    gen = torch.Generator().manual_seed(3)
    x0, eps, xi = (torch.randn(6, 1, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([1, 5, 20, 50, 80, 100])
    tables = SCHEDULE.on("cpu")
    clean = q_sample(tables, x0, t, eps)

    plain = InputRecorder()
    rows_plain = Objective(ObjectiveConfig(), SCHEDULE, "beta", 17, "cpu").row_losses(plain, x0, t, eps)
    assert torch.equal(plain.inputs[0], clean)  # gamma 0: the input of DDPM eq. 14, untouched

    perturbed = InputRecorder()
    objective = Objective(ObjectiveConfig(input_perturbation=0.1), SCHEDULE, "beta", 17, "cpu")
    rows_ip = objective.row_losses(perturbed, x0, t, eps, xi)
    shift = SCHEDULE.alphabar[t - 1].sub(1).neg().sqrt().float().view(-1, 1, 1, 1) * 0.1 * xi
    torch.testing.assert_close(perturbed.inputs[0] - clean, shift, atol=1e-6, rtol=1e-5)
    assert (perturbed.inputs[0] - clean).abs().max() > 1e-3
    # the target stays eps: a constant prediction c costs mean((c - eps)^2) either way
    torch.testing.assert_close(rows_ip, ((0.5 - eps) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(rows_ip, rows_plain)
    with pytest.raises(ValueError, match="xi"):
        objective.row_losses(perturbed, x0, t, eps)


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_the_trainer_draws_xi_after_eps_and_only_when_perturbing(gamma):
    """A training step's network input, rebuilt from the trainer's seed in its draw order (batch
    indices, t, eps, then xi only when gamma > 0): at gamma 0 it is q_sample(x0, t, eps) bit for
    bit and the generator has drawn nothing more, so every batch is as before the knob; at
    gamma 0.1 it is that plus sqrt(1 - abar_t) gamma xi."""
    from ddpm_engine.config import ExperimentConfig
    from ddpm_engine.training import Trainer

    config = ExperimentConfig.from_dict(
        {
            "diffusion": {"T": 100},
            "objective": {"input_perturbation": gamma},
            "train": {"batch_size": 8, "seed": 11, "ema_decay": None, "grad_clip": None},
        }
    )
    images = torch.rand(20, 1, 4, 4) * 2 - 1
    model = InputRecorder()
    trainer = Trainer(config, model, SCHEDULE, images, 17, torch.device("cpu"))
    trainer.train_step()

    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 20, (8,), generator=gen)
    t = torch.randint(1, 101, (8,), generator=gen)
    eps = torch.randn((8, 1, 4, 4), generator=gen)
    clean = q_sample(SCHEDULE.on("cpu"), images[idx], t, eps)
    if gamma == 0.0:
        assert torch.equal(model.inputs[0], clean)
        assert torch.equal(trainer.generator.get_state(), gen.get_state())
    else:
        xi = torch.randn((8, 1, 4, 4), generator=gen)
        shift = SCHEDULE.alphabar[t - 1].sub(1).neg().sqrt().float().view(-1, 1, 1, 1) * gamma * xi
        torch.testing.assert_close(model.inputs[0] - clean, shift, atol=1e-6, rtol=1e-5)
        assert torch.equal(trainer.generator.get_state(), gen.get_state())


@pytest.mark.parametrize("value", [-0.1, 1.0, True])
def test_input_perturbation_outside_its_range_is_refused(value):
    with pytest.raises(ValueError):
        ObjectiveConfig(input_perturbation=value)
