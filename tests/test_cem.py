"""CEM / MPPI on problems with a known optimum."""

from __future__ import annotations

import numpy as np
import pytest

from planners.cem import CEMConfig, CEMPlanner


def quadratic(target: np.ndarray):
    """Return of a sequence: minus the squared distance of each action to ``target[h]``."""
    def evaluate(seqs: np.ndarray) -> np.ndarray:
        return -((seqs - target) ** 2).sum(axis=(1, 2))
    return evaluate


@pytest.mark.parametrize("mppi", [False, True])
def test_finds_the_optimum_of_a_quadratic(mppi):
    rng = np.random.default_rng(0)
    target = rng.uniform(-0.8, 0.8, size=(6, 2))
    planner = CEMPlanner([-1, -1], [1, 1], CEMConfig(horizon=6, num_samples=128, num_elites=16,
                                                     iterations=16, mppi=mppi))
    res = planner.plan(quadratic(target), rng)
    np.testing.assert_allclose(res.mean, target, atol=0.06)
    np.testing.assert_allclose(res.action, target[0], atol=0.06)
    assert res.action.shape == (2,) and res.action.dtype == np.float32
    assert res.evaluations == 128 * 16
    # Returns improve from the first iteration to the last.
    assert res.returns[-1].max() >= res.returns[0].max()


def test_warm_start_shifts_the_previous_plan():
    rng = np.random.default_rng(1)
    target = np.linspace(-0.5, 0.5, 5)[:, None].repeat(2, 1)
    planner = CEMPlanner([-1, -1], [1, 1], CEMConfig(horizon=5, iterations=6, num_samples=96))
    first = planner.plan(quadratic(target), rng)
    seen = []
    planner.plan(lambda s: (seen.append(s.copy()), np.zeros(len(s)))[1], rng)
    # The first sample of the next call is the previous plan shifted by one step.
    expected = np.concatenate([first.mean[1:], first.mean[-1:]])
    np.testing.assert_allclose(seen[0][0], expected, atol=1e-12)
    planner.reset()
    planner.plan(lambda s: (seen.append(s.copy()), np.zeros(len(s)))[1], rng)
    np.testing.assert_allclose(seen[-planner.cfg.iterations][0], 0.0)  # back to the centre


def test_samples_stay_in_the_box_and_errors_are_clear():
    rng = np.random.default_rng(2)
    seen = []
    def evaluate(s):
        seen.append(s.copy())
        return s.sum(axis=(1, 2))
    planner = CEMPlanner([-1, 0], [1, 0.5], CEMConfig(horizon=3, num_samples=32, num_elites=4))
    res = planner.plan(evaluate, rng)
    allseen = np.concatenate(seen)
    assert allseen[..., 0].min() >= -1 and allseen[..., 1].max() <= 0.5
    assert res.action[1] > 0.3  # the return rewards large actions
    with pytest.raises(ValueError, match="num_elites"):
        CEMConfig(num_samples=4, num_elites=8)
    with pytest.raises(ValueError, match="finite returns"):
        CEMPlanner([-1], [1], CEMConfig(horizon=2, num_samples=4, num_elites=2)).plan(
            lambda s: np.full(len(s), np.nan), rng)
