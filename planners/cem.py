"""CEM and MPPI over action sequences (TD-MPC2-style), in numpy.

The planner sees a world only through ``evaluate(actions [N, H, A]) -> returns [N]``:
it knows nothing of Push-T or of the state layer. ``planners.world`` builds that callable
over any backend with fork + batched step + rewind.

Each iteration samples ``num_samples`` sequences around a Gaussian (mean, std), keeps the
``num_elites`` best by return (``topk``), and refits: CEM takes the elites' plain mean and
std, MPPI weights them with a softmax of their returns at ``temperature``. Planning
warm-starts from the previous call's mean shifted by one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def check_budget(cfg) -> None:
    """The checks every sequence planner's config shares (horizon, samples, elites,
    iterations)."""
    if cfg.horizon < 1 or cfg.num_samples < 1 or cfg.iterations < 1:
        raise ValueError("horizon, num_samples and iterations must be >= 1")
    if not 1 <= cfg.num_elites <= cfg.num_samples:
        raise ValueError(
            f"num_elites must be in [1, num_samples={cfg.num_samples}], got {cfg.num_elites}"
        )


class BoxPlanner:
    """What the sequence planners share: the action box and the warm start (the last
    call's mean, shifted by one step)."""

    def __init__(self, action_low, action_high):
        self.low = np.asarray(action_low, dtype=np.float64)
        self.high = np.asarray(action_high, dtype=np.float64)
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError("action_low and action_high must be 1-D arrays of one shape")
        if np.any(self.low >= self.high):
            raise ValueError("action_low must be below action_high")
        self.half = (self.high - self.low) / 2
        self.centre = (self.low + self.high) / 2
        self._mean: np.ndarray | None = None  # [H, A], warm start

    def reset(self) -> None:
        """Forget the warm start (call at the start of an episode)."""
        self._mean = None

    def _shifted_mean(self, horizon: int) -> np.ndarray:
        if self._mean is None:
            return np.tile(self.centre, (horizon, 1))
        return np.concatenate([self._mean[1:], self._mean[-1:]], axis=0)

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.low, self.high)


@dataclass
class CEMConfig:
    """Arguments of the sampling planner."""

    horizon: int = 8
    """Steps per action sequence."""
    num_samples: int = 64
    """Sequences evaluated per iteration."""
    num_elites: int = 8
    """Best sequences the distribution is refit to."""
    iterations: int = 4
    """Refits per planning call."""
    temperature: float = 0.5
    """MPPI softmax temperature over (normalised) elite returns."""
    min_std: float = 0.05
    """Floor of the sampling std (keeps exploring)."""
    init_std: float = 0.5
    """Std at the start of an episode."""
    momentum: float = 0.1
    """Share of the previous mean kept at each refit."""
    mppi: bool = False
    """MPPI weighting of the elites instead of CEM's uniform mean."""
    keep_mean: bool = True
    """Include the current mean itself as one sample (never worse than not planning)."""

    def __post_init__(self):
        check_budget(self)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class PlanResult:
    action: np.ndarray  # [A] first action of the plan
    mean: np.ndarray  # [H, A] the plan
    std: np.ndarray  # [H, A]
    best_return: float
    mean_elite_return: float
    returns: list[np.ndarray] = field(default_factory=list)  # per iteration [N]
    evaluations: int = 0
    sequence: np.ndarray | None = None  # [H, A] the sequence acted on (best, or MPPI's mean)


class CEMPlanner(BoxPlanner):
    """Cross-entropy method / MPPI over ``[H, A]`` action sequences in a box.

    Args:
        action_low, action_high: the action box (arrays of shape ``[A]``).
        config: :class:`CEMConfig`.
    """

    def __init__(self, action_low, action_high, config: CEMConfig | None = None):
        super().__init__(action_low, action_high)
        self.cfg = config or CEMConfig()

    def plan(
        self,
        evaluate: Callable[[np.ndarray], np.ndarray],
        rng: np.random.Generator,
    ) -> PlanResult:
        cfg, A = self.cfg, len(self.low)
        half = self.half
        mean = self._shifted_mean(cfg.horizon)  # warm start: drop the executed step
        std = np.full((cfg.horizon, A), cfg.init_std) * half
        all_returns, evaluations = [], 0
        best_return, best_seq = -np.inf, mean
        for _ in range(cfg.iterations):
            noise = rng.standard_normal((cfg.num_samples, cfg.horizon, A))
            samples = np.clip(mean + std * noise, self.low, self.high)  # [N, H, A]
            if cfg.keep_mean:
                samples[0] = np.clip(mean, self.low, self.high)
            returns = np.asarray(evaluate(samples), dtype=np.float64)
            if returns.shape != (cfg.num_samples,) or not np.all(np.isfinite(returns)):
                raise ValueError(
                    f"evaluate must return {cfg.num_samples} finite returns, got "
                    f"shape {returns.shape}"
                )
            evaluations += cfg.num_samples
            all_returns.append(returns)
            elite_idx = np.argsort(-returns, kind="stable")[: cfg.num_elites]
            elites, elite_ret = samples[elite_idx], returns[elite_idx]
            if elite_ret[0] > best_return:
                best_return, best_seq = float(elite_ret[0]), elites[0].copy()
            if cfg.mppi:
                z = (elite_ret - elite_ret.max()) / (np.ptp(elite_ret) + 1e-9)
                w = np.exp(z / cfg.temperature)
            else:
                w = np.ones(len(elite_ret))
            w = w / w.sum()
            new_mean = np.einsum("n,nha->ha", w, elites)
            new_std = np.sqrt(np.einsum("n,nha->ha", w, (elites - new_mean) ** 2))
            mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
            std = np.clip(new_std, cfg.min_std * half, half)
        self._mean = mean
        # Act on the best sequence seen (CEM) or the refit mean (MPPI's smoothed plan).
        plan = mean if cfg.mppi else best_seq
        return PlanResult(
            action=np.clip(plan[0], self.low, self.high).astype(np.float32),
            mean=mean,
            std=std,
            best_return=float(best_return),
            mean_elite_return=float(np.mean(np.sort(all_returns[-1])[-cfg.num_elites :])),
            returns=all_returns,
            evaluations=evaluations,
            sequence=np.clip(plan, self.low, self.high).astype(np.float32),
        )
