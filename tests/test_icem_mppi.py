"""iCEM and TD-MPC2's MPPI on problems with a known optimum, and their published parts."""

from __future__ import annotations

import numpy as np
import pytest

from planners.icem import ICEMConfig, ICEMPlanner, MPPIConfig, MPPIPlanner, colored_noise


def quadratic(target: np.ndarray):
    def evaluate(seqs: np.ndarray) -> np.ndarray:
        return -((seqs - target) ** 2).sum(axis=(1, 2))
    return evaluate


def smooth_target(horizon: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, horizon)
    return np.stack([0.7 * np.sin(3 * t), 0.5 - t], axis=1)  # [H, 2], inside the box


@pytest.mark.parametrize("make", [
    lambda: ICEMPlanner([-1, -1], [1, 1], ICEMConfig(horizon=8, num_samples=128, num_elites=16,
                                                     iterations=12)),
    lambda: MPPIPlanner([-1, -1], [1, 1], MPPIConfig(horizon=8, num_samples=128, num_elites=16,
                                                     iterations=12, greedy=True)),
], ids=["icem", "mppi"])
def test_finds_the_optimum_of_a_quadratic(make):
    rng = np.random.default_rng(0)
    target = smooth_target()
    planner = make()
    res = planner.plan(quadratic(target), rng)
    # (coloured noise corrects slow deviations fast and step-to-step ones slowly)
    np.testing.assert_allclose(res.sequence, target, atol=0.15)
    assert res.action.shape == (2,) and res.action.dtype == np.float32
    assert res.returns[-1].max() >= res.returns[0].max()
    assert -res.best_return < 0.05  # from about -3 for the box's centre


def test_coloured_noise_has_unit_variance_and_grows_smoother_with_beta():
    rng = np.random.default_rng(1)
    lag1 = []
    for beta in (0.0, 1.0, 2.0, 3.0):
        x = colored_noise(rng, beta, (20000, 8, 2))
        assert x.shape == (20000, 8, 2)
        assert abs(x.std() - 1.0) < 0.02, (beta, x.std())
        lag1.append(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1])
    assert abs(lag1[0]) < 0.02  # white
    assert all(a < b for a, b in zip(lag1, lag1[1:])), lag1  # redder is smoother


def test_icem_sample_counts_decay_and_elites_carry_over():
    cfg = ICEMConfig(horizon=4, num_samples=64, num_elites=8, iterations=3, sample_decay=2.0,
                     keep_elites=0.5)
    assert [cfg.samples_at(i) for i in range(3)] == [64, 32, 16]
    planner = ICEMPlanner([-1], [1], cfg)
    rng = np.random.default_rng(2)
    seen = []

    def evaluate(s):
        seen.append(s.copy())
        return -np.abs(s - 0.3).sum(axis=(1, 2))

    first = planner.plan(evaluate, rng)
    # iteration sizes: 64; 32 + 4 kept; 16 + 4 kept + the mean
    assert [len(s) for s in seen] == [64, 36, 21]
    # (the budget counts the elites a call inherits from the one before; the first has none)
    assert first.evaluations == 64 + 36 + 21 == cfg.budget - 4
    # Elites kept between iterations: the best 4 of iteration 0 reappear in iteration 1.
    best0 = seen[0][np.argsort(-evaluate(seen[0]))[:4]]
    np.testing.assert_array_equal(seen[1][32:], best0)
    # The last iteration includes the refit mean... and the executed sequence is the best
    # one seen over all iterations.
    allseen = np.concatenate(seen)
    np.testing.assert_array_equal(first.sequence, allseen[np.argmax(evaluate(allseen))].astype(np.float32))
    seen.clear()
    assert planner.plan(evaluate, rng).evaluations == cfg.budget
    planner.reset()
    seen.clear()
    planner.plan(evaluate, rng)
    assert len(seen[0]) == 64  # nothing carried over after reset


def test_icem_can_execute_the_last_mean_instead_of_the_best_seen():
    # The mean is the last sample of the last iteration; with execute=mean that sample
    # and its own return come back, not the best of all the samples.
    cfg = ICEMConfig(horizon=4, num_samples=32, num_elites=4, iterations=3, execute="mean")
    seen = []

    def score(s):
        return -np.abs(s - 0.3).sum(axis=(1, 2))

    def evaluate(s):
        seen.append(s.copy())
        return score(s)

    res = ICEMPlanner([-1], [1], cfg).plan(evaluate, np.random.default_rng(5))
    mean_sample = seen[-1][-1]
    np.testing.assert_array_equal(res.sequence, mean_sample.astype(np.float32))
    assert res.best_return == float(score(mean_sample[None])[0])
    assert res.best_return < max(float(score(s).max()) for s in seen)  # not the best
    # Same rng, same samples: only the choice differs.
    best = ICEMPlanner([-1], [1], ICEMConfig(horizon=4, num_samples=32, num_elites=4,
                                             iterations=3)).plan(evaluate, np.random.default_rng(5))
    np.testing.assert_array_equal(best.mean, res.mean)
    assert best.best_return > res.best_return
    with pytest.raises(ValueError, match="execute"):
        ICEMConfig(execute="median")


def test_icem_next_call_starts_from_shifted_elites():
    cfg = ICEMConfig(horizon=5, num_samples=32, num_elites=4, iterations=2, keep_elites=1.0)
    planner = ICEMPlanner([-1], [1], cfg)
    rng = np.random.default_rng(3)
    calls = []

    def evaluate(s):
        calls.append(s.copy())
        return -np.abs(s - np.linspace(-0.5, 0.5, 5)[None, :, None]).sum(axis=(1, 2))

    planner.plan(evaluate, rng)
    last = calls[-1]
    elites = last[np.argsort(-evaluate(last), kind="stable")[:4]]
    calls.clear()
    planner.plan(evaluate, rng)
    kept = calls[0][32:]
    np.testing.assert_array_equal(kept[:, :-1], elites[:, 1:])
    np.testing.assert_array_equal(kept[:, -1], elites[:, -1])


def test_mppi_weights_follow_the_temperature():
    # Two-point problem: elites split between two returns; a high temperature puts all
    # the weight on the better one, a low one averages them.
    def evaluate(s):
        return np.where(s[:, 0, 0] > 0, 1.0, 0.0)

    means = []
    for temperature in (0.01, 50.0):
        p = MPPIPlanner([-1], [1], MPPIConfig(horizon=1, num_samples=256, num_elites=256,
                                              iterations=1, temperature=temperature,
                                              momentum=0.0))
        means.append(float(p.plan(evaluate, np.random.default_rng(4)).mean[0, 0]))
    assert abs(means[0]) < 0.15  # ~ the mean of all samples (about 0)
    assert means[1] > 0.5  # ~ the mean of the positive half


def test_bad_configs_and_returns_are_refused():
    with pytest.raises(ValueError, match="num_elites"):
        ICEMConfig(num_samples=4, num_elites=8)
    with pytest.raises(ValueError, match="sample_decay"):
        ICEMConfig(sample_decay=0.5)
    with pytest.raises(ValueError, match="temperature"):
        MPPIConfig(temperature=0.0)
    with pytest.raises(ValueError, match="finite returns"):
        ICEMPlanner([-1], [1], ICEMConfig(horizon=2, num_samples=4, num_elites=2)).plan(
            lambda s: np.full(len(s), np.nan), np.random.default_rng(0))
