"""iCEM (Pinneri et al., 2020, "Sample-efficient Cross-Entropy Method for Real-time
Planning") and MPPI as TD-MPC2 runs it (Hansen et al., 2024), in numpy.

Both see a world only through ``evaluate(actions [N, H, A]) -> returns [N]`` and return
a :class:`planners.cem.PlanResult`, like :class:`planners.cem.CEMPlanner`.

iCEM's changes to CEM, each a field of :class:`ICEMConfig`:

* *coloured noise*: samples are correlated in time, with a power spectrum ``1 / f**beta``
  (``noise_beta``; 0 is white noise, 2 is smooth "red" noise), so a sequence is a smooth
  motion rather than jitter;
* *decaying sample counts*: iteration ``i`` draws ``num_samples * decay**-i`` sequences,
  never fewer than twice the elites;
* *elites kept*: a fraction of each iteration's elites joins the next iteration, and at a
  new call the last elites, shifted by one step, join the first iteration;
* *the mean as a sample* in the last iteration, and *the best sequence seen* is the one
  executed (not the refit mean); ``execute="mean"`` acts on that last mean instead, which
  is never chosen for its score and so is not over-promised by the winner's curse.

TD-MPC2's MPPI: sample around (mean, std), keep the ``num_elites`` best, weight them by
``exp(temperature * (return - max return))``, refit mean and std (std clamped to
``[min_std, max_std]``), mix the mean with momentum; the executed sequence is an elite
drawn by its weight (or the best, with ``greedy``). Std restarts at ``max_std`` each call,
the mean is the previous call's shifted by one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planners.cem import BoxPlanner, PlanResult, check_budget

Evaluate = Callable[[np.ndarray], np.ndarray]


def colored_noise(rng: np.random.Generator, beta: float, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise of unit variance per sequence, with power spectrum ``1 / f**beta``
    along axis 1 (time) of ``shape = (N, H, A)``."""
    n, horizon, dims = shape
    if beta == 0 or horizon < 2:
        return rng.standard_normal(shape)
    freqs = np.fft.rfftfreq(horizon)
    freqs[0] = freqs[1]  # the zero frequency (the sequence's mean) as the lowest one
    amp = freqs ** (-beta / 2.0)
    spec = (rng.standard_normal((n, dims, len(freqs))) +
            1j * rng.standard_normal((n, dims, len(freqs)))) * amp  # fmt: skip
    x = np.fft.irfft(spec, n=horizon, axis=-1)  # [N, A, H]
    # Normalise by this spectrum's expected variance (not each sample's own std), so the
    # noise stays Gaussian: irfft weighs the zero (and, for even H, the Nyquist)
    # frequency's real part once and every other frequency's two parts twice.
    weight = np.full(len(freqs), 4.0)
    weight[0] = 1.0
    if horizon % 2 == 0:
        weight[-1] = 1.0
    expected_var = (weight * amp**2).sum() / horizon**2
    return np.moveaxis(x / np.sqrt(expected_var), 1, 2)


def _check_returns(returns: np.ndarray, n: int) -> np.ndarray:
    returns = np.asarray(returns, dtype=np.float64)
    if returns.shape != (n,) or not np.all(np.isfinite(returns)):
        raise ValueError(f"evaluate must return {n} finite returns, got shape {returns.shape}")
    return returns


@dataclass
class ICEMConfig:
    """Arguments of iCEM (defaults: the paper's, for a small budget)."""

    horizon: int = 8
    num_samples: int = 64
    """Sequences of the first iteration."""
    num_elites: int = 8
    iterations: int = 3
    noise_beta: float = 2.0
    """Colour of the noise along time: 0 white, 1 pink, 2 red (smooth)."""
    sample_decay: float = 1.25
    """Iteration ``i`` draws ``num_samples * sample_decay**-i`` sequences."""
    keep_elites: float = 0.3
    """Fraction of the elites carried into the next iteration and the next call."""
    init_std: float = 0.5
    """Std at the start of each call (in half-widths of the box)."""
    min_std: float = 0.02
    momentum: float = 0.1
    """Share of the previous mean and std kept at each refit."""
    execute: str = "best"
    """The sequence returned: ``best`` (the best one seen, the paper's) or ``mean`` (the
    last iteration's mean, which is evaluated as a sample there)."""

    def __post_init__(self):
        check_budget(self)
        if self.execute not in ("best", "mean"):
            raise ValueError(f"unknown execute {self.execute!r}: best or mean")
        if self.sample_decay < 1 or not 0 <= self.keep_elites <= 1 or self.noise_beta < 0:
            raise ValueError("need sample_decay >= 1, 0 <= keep_elites <= 1, noise_beta >= 0")

    def samples_at(self, iteration: int) -> int:
        """Sequences drawn at ``iteration`` (0-based)."""
        n = int(round(self.num_samples * self.sample_decay ** (-iteration)))
        return max(n, 2 * self.num_elites)

    @property
    def budget(self) -> int:
        """Sequences evaluated per call (model rollouts), kept elites included."""
        kept = int(round(self.keep_elites * self.num_elites))
        return sum(self.samples_at(i) for i in range(self.iterations)) + kept * self.iterations + 1


class ICEMPlanner(BoxPlanner):
    """iCEM over ``[H, A]`` action sequences in a box (see the module docstring)."""

    def __init__(self, action_low, action_high, config: ICEMConfig | None = None):
        super().__init__(action_low, action_high)
        self.cfg = config or ICEMConfig()
        self._elites: np.ndarray | None = None  # [K', H, A] kept from the last call

    def reset(self) -> None:
        super().reset()
        self._elites = None

    def plan(self, evaluate: Evaluate, rng: np.random.Generator) -> PlanResult:
        cfg, A = self.cfg, len(self.low)
        n_keep = int(round(cfg.keep_elites * cfg.num_elites))
        mean = self._shifted_mean(cfg.horizon)
        std = np.full((cfg.horizon, A), cfg.init_std) * self.half
        kept = None
        if self._elites is not None and n_keep:
            shifted = self._elites[:n_keep]
            kept = np.concatenate([shifted[:, 1:], shifted[:, -1:]], axis=1)
        all_returns, evaluations = [], 0
        best_return, best_seq = -np.inf, mean
        elites = None
        for i in range(cfg.iterations):
            n = cfg.samples_at(i)
            noise = colored_noise(rng, cfg.noise_beta, (n, cfg.horizon, A))
            parts = [self._clip(mean + std * noise)]
            if kept is not None:
                parts.append(kept)
            if i == cfg.iterations - 1:
                parts.append(self._clip(mean)[None])
            samples = np.concatenate(parts, axis=0)
            returns = _check_returns(evaluate(samples), len(samples))
            evaluations += len(samples)
            all_returns.append(returns)
            order = np.argsort(-returns, kind="stable")[: cfg.num_elites]
            elites, elite_ret = samples[order], returns[order]
            if elite_ret[0] > best_return:
                best_return, best_seq = float(elite_ret[0]), elites[0].copy()
            mean = cfg.momentum * mean + (1 - cfg.momentum) * elites.mean(axis=0)
            std = cfg.momentum * std + (1 - cfg.momentum) * elites.std(axis=0)
            std = np.clip(std, cfg.min_std * self.half, self.half)
            kept = elites[:n_keep] if n_keep else None
        self._mean, self._elites = mean, elites
        if cfg.execute == "mean":  # the last iteration's last sample
            best_seq, best_return = samples[-1].copy(), float(returns[-1])
        return PlanResult(
            action=self._clip(best_seq[0]).astype(np.float32), mean=mean, std=std,
            best_return=float(best_return),
            mean_elite_return=float(np.mean(np.sort(all_returns[-1])[-cfg.num_elites:])),
            returns=all_returns, evaluations=evaluations,
            sequence=self._clip(best_seq).astype(np.float32),
        )  # fmt: skip


@dataclass
class MPPIConfig:
    """Arguments of MPPI (defaults: TD-MPC2's, except the sample counts)."""

    horizon: int = 8
    num_samples: int = 64
    num_elites: int = 8
    iterations: int = 3
    temperature: float = 0.5
    """Elite weights ``exp(temperature * (return - max))``: higher is greedier."""
    min_std: float = 0.05
    max_std: float = 2.0
    """Std bounds (in half-widths of the box); each call starts at ``max_std``."""
    momentum: float = 0.1
    """Share of the previous mean kept at each refit (TD-MPC's)."""
    greedy: bool = False
    """Execute the best elite instead of one drawn by weight (TD-MPC2's eval mode draws)."""

    def __post_init__(self):
        check_budget(self)
        if self.temperature <= 0 or not 0 < self.min_std <= self.max_std:
            raise ValueError("need temperature > 0 and 0 < min_std <= max_std")

    @property
    def budget(self) -> int:
        return self.num_samples * self.iterations


class MPPIPlanner(BoxPlanner):
    """MPPI over ``[H, A]`` action sequences in a box, as TD-MPC2's ``plan``."""

    def __init__(self, action_low, action_high, config: MPPIConfig | None = None):
        super().__init__(action_low, action_high)
        self.cfg = config or MPPIConfig()

    def plan(self, evaluate: Evaluate, rng: np.random.Generator) -> PlanResult:
        cfg, A = self.cfg, len(self.low)
        mean = self._shifted_mean(cfg.horizon)
        std = np.full((cfg.horizon, A), cfg.max_std) * self.half
        all_returns, evaluations = [], 0
        best_return = -np.inf
        for _ in range(cfg.iterations):
            samples = self._clip(mean + std * rng.standard_normal((cfg.num_samples, cfg.horizon, A)))
            returns = _check_returns(evaluate(samples), cfg.num_samples)
            evaluations += cfg.num_samples
            all_returns.append(returns)
            order = np.argsort(-returns, kind="stable")[: cfg.num_elites]
            elites, elite_ret = samples[order], returns[order]
            best_return = max(best_return, float(elite_ret[0]))
            score = np.exp(cfg.temperature * (elite_ret - elite_ret.max()))
            score /= score.sum()
            new_mean = np.einsum("n,nha->ha", score, elites)
            new_std = np.sqrt(np.einsum("n,nha->ha", score, (elites - new_mean) ** 2))
            mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
            std = np.clip(new_std, cfg.min_std * self.half, cfg.max_std * self.half)
        pick = 0 if cfg.greedy else int(rng.choice(len(score), p=score))
        seq = elites[pick]
        self._mean = mean
        return PlanResult(
            action=self._clip(seq[0]).astype(np.float32), mean=mean, std=std,
            best_return=float(best_return),
            mean_elite_return=float(np.mean(elite_ret)), returns=all_returns,
            evaluations=evaluations, sequence=self._clip(seq).astype(np.float32),
        )  # fmt: skip
