"""The training step, EMA and checkpoints: everything needed to stop and resume exactly."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

from .config import ExperimentConfig
from .files import atomic_write
from .objectives import Objective, TimestepSampler, gaussian_noise
from .recorder import RunNote
from .schedule import Schedule


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; names the step and last finite loss."""


class EMA:
    """Exponential moving average of the weights, updated with foreach ops (one kernel per
    group, no Python loop over parameters). The decay warms up as (1 + n) / (10 + n), so the
    average is not dominated by the random initialisation in short runs."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def learning_rate(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak``, then constant (as DDPM trains)."""
    if warmup_steps <= 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup_steps)


class Trainer:
    """Owns the model, its EMA, the optimizer and every random stream of one run.

    All randomness of training (batch indices, t, noise) comes from one generator whose
    state is checkpointed, plus torch's global RNG (dropout), also checkpointed: a resumed
    run continues the very same loss curve.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        model: torch.nn.Module,
        schedule: Schedule,
        train_images: torch.Tensor,
        levels: int,
        device: torch.device,
        autocast=None,
    ):
        self.config, self.device, self.autocast = config, device, autocast
        self.model = model
        self.forward_model = torch.compile(model) if config.train.compile else model
        self.images = train_images  # float, [-1, 1], on device
        tc = config.train
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            foreach=True,
        )
        self.ema = EMA(model, tc.ema_decay) if tc.ema_decay is not None else None
        self.objective = Objective(config.objective, schedule, config.diffusion.sigma, levels, device)
        self.t_sampler = TimestepSampler(
            schedule.T,
            config.objective.t_sampling,
            config.objective.importance_history,
            device,
            t_range=config.train.t_range,
        )
        self.generator = torch.Generator(device=device).manual_seed(tc.seed)
        self.step = 0
        self.train_seconds = 0.0  # wall time inside train_step, for budget_by: seconds
        self.history: dict[str, list] = {"train": [], "per_t": [], "bound": []}
        self.last_finite_loss: float | None = None
        # (step, loss, grad norm) since the last flush_window, kept on the device
        self.unlogged: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    @property
    def sampling_model(self) -> torch.nn.Module:
        """The weights samples and probes use: EMA when on and requested, else the raw model."""
        if self.ema is not None and self.config.sample.use_ema:
            return self.ema.model
        return self.model

    def train_step(self) -> None:
        tc = self.config.train
        lr = learning_rate(self.step, tc.lr, tc.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gen = self.generator
        idx = torch.randint(0, self.images.shape[0], (tc.batch_size,), generator=gen, device=gen.device)
        x0 = self.images[idx.to(self.device)]
        t, importance = self.t_sampler.sample(tc.batch_size, gen)
        eps = gaussian_noise(x0.shape, gen, self.device, self.config.objective.noise_clip)
        # DDPM-IP's xi comes after eps from the same generator, and only when it is on: with it
        # off the generator's stream, hence every batch, is what it was before the knob existed
        xi = gaussian_noise(x0.shape, gen, self.device, None) if self.config.objective.input_perturbation else None
        self.model.train()
        if self.autocast is not None:
            with self.autocast():
                rows = self.objective.row_losses(self.forward_model, x0, t, eps, xi)
        else:
            rows = self.objective.row_losses(self.forward_model, x0, t, eps, xi)
        loss = (rows * importance).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if tc.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.t_sampler.update(t, rows)
        self.step += 1
        # Kept as tensors: reading them would make the host wait for the device every step.
        self.unlogged.append((self.step, loss.detach(), grad_norm))

    def flush_window(self, images_per_s: float) -> dict[str, float]:
        """Check the steps since the last flush for a non-finite loss and summarise them."""
        steps = [s for s, _, _ in self.unlogged]
        losses = torch.stack([loss for _, loss, _ in self.unlogged]).float().cpu()
        norms = [n for _, _, n in self.unlogged if n is not None]
        self.unlogged.clear()
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            if bad > 0:
                self.last_finite_loss = float(losses[bad - 1])
            raise NonFiniteLossError(
                f"loss became {float(losses[bad])} at step {steps[bad]}; last finite loss {self.last_finite_loss}"
            )
        self.last_finite_loss = float(losses[-1])
        row = {
            "step": self.step,
            "loss": float(losses.mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(torch.stack(norms).float().mean()) if norms else float("nan"),
            "images_per_s": images_per_s,
        }
        self.history["train"].append(row)
        return row

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "t_sampler": self.t_sampler.state_dict(),
            "history": self.history,
            "last_finite_loss": self.last_finite_loss,
            "train_seconds": self.train_seconds,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.t_sampler.load_state_dict(state["t_sampler"])
        self.history = state["history"]
        self.last_finite_loss = state["last_finite_loss"]
        self.train_seconds = state.get("train_seconds", 0.0)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def save(self, directory: Path) -> Path:
        """Write ``last.pt`` atomically: a kill mid-write leaves the previous checkpoint."""
        state = self.state_dict()
        return atomic_write(Path(directory) / "last.pt", lambda tmp: torch.save(state, tmp))

    def restore(self, directory: Path | None) -> bool:
        """Load ``last.pt`` from ``directory`` if there is one; True when resumed.

        A checkpoint file that does not load (truncated by a full disk or a kill outside our
        atomic writes) is set aside as ``last.pt.corrupt`` with a warning (a RunNote: the
        harness keeps it in the run's record) and the run starts over: raising would fail the
        key on every retry, forever."""
        path = None if directory is None else Path(directory) / "last.pt"
        if path is None or not path.exists():
            return False
        try:
            # Loaded to CPU: RNG states must be CPU tensors; load_state_dict moves the rest.
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - whatever torch raises for a damaged file
            os.replace(path, path.with_name("last.pt.corrupt"))
            warnings.warn(
                f"checkpoint {path} does not load ({type(exc).__name__}: {str(exc)[:200]}); "
                "set aside as last.pt.corrupt, the run starts over",
                RunNote,
                stacklevel=2,
            )
            return False
        self.load_state_dict(state)
        return True
