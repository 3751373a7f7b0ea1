"""The world-model build's per-frame preprocessing, the old layout against the new one,
in interleaved rounds, medians reported, every result checked equal bit for bit:

- a collected frame: gym-pusht's own picture (``env._render``: a strided copy of the
  screen) against ``pusht.FrameRenderer`` (the screen's RGB bytes);
- state maps: 1,024 states in one pass against ``features.state_map`` (256 per pass);
- the renderer's anchor latents: ``render_anchors`` in 1,024-state chunks against 256;
- VAE encoding: ``encode_episodes`` in 512-frame chunks against 128;
- a simulator frame (four control steps): a loop of gym-pusht's ``step``, with a shapely
  coverage at each, against ``pusht-sim``'s ``advance`` (physics on floats, coverage only
  where it can matter), on the scripted pusher's frames from near-goal and uniform starts.

    python benchmarks/build_preprocessing.py [--rounds 5] [--weights DIR]

With no ``--weights`` the shipped weights are used (only their speed is measured).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from agents.scripted import ScriptedPusher
from arcfab_gym.models.mini_dreamzero import features
from arcfab_gym.models.mini_dreamzero.backend import Weights
from arcfab_gym.models.mini_dreamzero.training import encode_episodes, render_anchors
from arcfab_gym.models.pusht_sim import _CanonicalPushT
from arcfab_gym.tasks import pusht
from arcfab_gym.tasks.pusht import PushTEnv


def _random_states(rng: np.random.Generator, n: int) -> torch.Tensor:
    agent = rng.uniform(20, 492, (n, 2))
    block = np.c_[rng.uniform(80, 430, (n, 2)), rng.uniform(-np.pi, np.pi, n)]
    return torch.from_numpy(features.state_from_poses(agent, block))


class _GymStepPushT(_CanonicalPushT):
    """The simulator as it stepped before ``advance``: a coverage at every control step."""

    def _get_coverage(self) -> float:
        pose = np.array([*self.block.position, self.block.angle])
        return pusht.coverage(pusht.t_polygon(pose), self.goal_pose)

    def advance(self, target, repeats):
        contacts = 0
        for _ in range(repeats):
            _, _, terminated, _, info = PushTEnv.step(self, target)
            contacts += int(info["n_contacts"])
            if terminated:
                break
        return float(info["coverage"]), bool(info["is_success"]), contacts


def _sim_episodes(rng: np.random.Generator, n: int, frames: int):
    """``n`` (initial state, goal, targets) of the scripted pusher, half from near-goal
    starts, recorded once so that both paths step the same frames."""
    out = []
    for i in range(n):
        prompt = pusht.PROMPTS[i % len(pusht.PROMPTS)]
        goal = pusht.goal_pose(prompt)
        if i % 2:
            init = pusht.sample_initial_state(rng)
        else:
            block = goal + np.r_[rng.normal(0, 30, 2), rng.normal(0, 0.35)]
            init = pusht.state_for_pose(block[:2] + rng.uniform(-120, 120, 2), block)
        env = _CanonicalPushT(obs_type="state")
        env.reset(options={"reset_to_state": init})
        env.goal_pose = goal
        policy, targets = ScriptedPusher(rng, noise_px=5.0), []
        for _ in range(frames):
            obs = {"agent_pos": np.array(env.agent.position), "goal_pose": goal,
                   "block_pose": np.array([*env.block.position, env.block.angle])}  # fmt: skip
            targets.append(pusht.action_to_target(policy(obs)))
            env.advance(targets[-1], 4)
        out.append((init, goal, targets))
    return out


def _run_sim(cls, episodes) -> list:
    results = []
    for init, goal, targets in episodes:
        env = cls(obs_type="state")
        env.reset(options={"reset_to_state": init})
        env.goal_pose = goal
        results += [env.advance(t, 4) for t in targets]
        results.append((*env.agent.position, *env.agent.velocity, *env.block.position,
                        env.block.angle, env.block.angular_velocity))  # fmt: skip
    return results


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(a, b))


def side_by_side(name: str, items: int, unit: str, old: Callable, new: Callable, rounds: int) -> None:
    """Run ``old`` and ``new`` alternately; print per-item medians and their ratio."""
    t_old, t_new = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a = old()
        t1 = time.perf_counter()
        b = new()
        t2 = time.perf_counter()
        t_old.append(t1 - t0)
        t_new.append(t2 - t1)
        assert _equal(a, b), f"{name}: the new layout changed the result"
    o, n = statistics.median(t_old) / items * 1e3, statistics.median(t_new) / items * 1e3
    print(f"{name:<34} {o:>9.3f} {n:>9.3f} {unit:<8} {o / n:>5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, as the build's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    weights = Weights.load(args.weights)
    print(f"torch threads {torch.get_num_threads()}; weights {weights.meta.get('weights_id', '?')}")
    print(f"{'':<34} {'old':>9} {'new':>9} {'ms per':<8} {'ratio':>6}")

    renderer = pusht.FrameRenderer(weights.vae.cfg.frame_size)
    poses = [(rng.uniform(20, 492, 2), np.r_[rng.uniform(80, 430, 2), rng.uniform(-3, 3)])
             for _ in range(200)]  # fmt: skip
    goal = pusht.goal_pose(pusht.DEFAULT_PROMPT)

    def frames(picture):
        def run():
            out = []
            for agent, block in poses:
                renderer.place(agent, block, goal)
                out.append(picture())
            return out
        return run

    side_by_side("collected frame", len(poses), "frame",
                 frames(lambda: renderer._env._render(visualize=False)), frames(renderer.picture),
                 args.rounds)  # fmt: skip
    renderer.close()

    states = _random_states(rng, 4096)
    side_by_side("state maps", len(states), "state",
                 lambda: torch.cat([features._state_map(c, features.MAP_SIZE) for c in states.split(1024)]),
                 lambda: features.state_map(states), args.rounds)  # fmt: skip

    episodes = {"state": states.view(64, 64, -1), "prompt_id": torch.zeros(64, dtype=torch.long)}
    side_by_side("anchor latents", len(states), "frame",
                 lambda: render_anchors(weights.renderer, episodes, chunk=1024),
                 lambda: render_anchors(weights.renderer, episodes), args.rounds)  # fmt: skip

    size = weights.vae.cfg.frame_size
    data = {
        "frames": rng.integers(0, 256, (16, 64, size, size, 3), dtype=np.uint8),
        "agent_pos": rng.uniform(20, 492, (16, 64, 2)).astype(np.float32),
        "block_pose": np.c_[rng.uniform(80, 430, (16 * 64, 2)), rng.uniform(-3, 3, 16 * 64)]
        .reshape(16, 64, 3).astype(np.float32),
        "actions": rng.uniform(-1, 1, (16, 63, 2)).astype(np.float32),
        "prompt_id": np.zeros(16, np.int64),
    }
    side_by_side("VAE encoding", 16 * 64, "frame",
                 lambda: encode_episodes(weights.vae, data, chunk=512, coverage=False)["z"],
                 lambda: encode_episodes(weights.vae, data, coverage=False)["z"], args.rounds)  # fmt: skip

    episodes = _sim_episodes(rng, 8, 60)
    side_by_side("simulator frame (4 control steps)", 8 * 60, "frame",
                 lambda: _run_sim(_GymStepPushT, episodes),
                 lambda: _run_sim(_CanonicalPushT, episodes), args.rounds)  # fmt: skip


if __name__ == "__main__":
    main()
