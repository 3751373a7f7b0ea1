"""Collect Push-T episodes from the ``pusht-sim`` backend for world-model training.

Each episode: a random start (gym-pusht's distribution), a random prompt (goal), and a
policy drawn per episode -- *pokes* (the pusher goes to a random point of the T's outline
and pushes through it in a random direction, again and again: most frames are contact,
which is what a world model you plan in has to get right), the scripted pusher with noise
and random waypoints, or smooth random motion (so the data also covers free motion and
pushes that go wrong). One model frame holds the action for ``action_repeat`` control steps. Output: one
``.npz`` (no pickled objects) with, for ``E`` episodes of ``T`` frames:

    frames      uint8   [E, T, S, S, 3]   rendered by gym-pusht's renderer
    agent_pos   float32 [E, T, 2]         px
    block_pose  float32 [E, T, 3]         x, y px; angle rad
    actions     float32 [E, T-1, 2]       in [-1, 1], action t leads from frame t to t+1
    coverage    float32 [E, T]            of the episode's goal
    success     bool    [E, T]
    prompt_id   int64   [E]               index into arcfab_gym.PROMPTS
    policy_id   int64   [E]               0 scripted, 1 random motion, 2 pokes, 3 jumps,
                                          4 an iCEM planner with exploration noise
    near_goal   bool    [E]               the episode started with the T near its goal

    python -m experiments.collect episodes=800 workers=2 out=data/pusht_train.npz
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import shapely.geometry as sg
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from agents.scripted import ScriptedPusher
from arcfab_gym.atomic import atomic_path
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht


@dataclass
class CollectConfig:
    """Arguments of data collection."""

    episodes: int = 800
    """Number of episodes."""
    frames: int = 64
    """Frames per episode (including the start frame)."""
    action_repeat: int = 4
    """Control steps (0.1 s each) per frame."""
    frame_size: int = 64
    """Side of the rendered frames in pixels."""
    random_policy_fraction: float = 0.1
    """Share of episodes driven by smooth random motion."""
    poke_policy_fraction: float = 0.65
    """Share of episodes driven by pokes at the T."""
    jump_policy_fraction: float = 0.0
    """Share of episodes driven by jumps: targets far from the pusher, as a sampling
    planner's candidates are (the rest: the scripted pusher)."""
    planner_policy_fraction: float = 0.0
    """Share of episodes driven by an iCEM planner with the simulator as its model and
    exploration noise on what it executes: the states a planner visits on its way to the
    goal, and the fine pushes that finish the task (DAgger-style data)."""
    planner_samples: int = 8
    """Samples of the data-collecting planner's first iteration (horizon 6, 2 iterations)."""
    planner_model: str | None = None
    """Where the data-collecting planner imagines: None for a copy of the simulator, or a
    mini-dreamzero weights folder -- DAgger proper: the states that model's own plans
    lead to, labelled by the real physics."""
    near_goal_fraction: float = 0.0
    """Share of episodes (of any policy) that start with the T near its goal pose
    (gym-pusht's start distribution almost never puts it there: in 3,000 uniform-start
    episodes 0.02 % of frames have coverage above 0.8)."""
    near_goal_px: float = 30.0
    """Spread of a near-goal start's T position around the goal (px, per axis)."""
    near_goal_rad: float = 0.35
    """Spread of a near-goal start's T angle around the goal (rad)."""
    seed: int = 0
    """Base seed; episode i uses seed + i, so runs extend reproducibly."""
    workers: int = 2
    """Processes to collect with."""
    out: str = "data/pusht_train.npz"
    """Output file."""


ConfigStore.instance().store(name="collect_schema", node=CollectConfig)


class SmoothRandom:
    """Random motion with momentum: a target that drifts, sometimes jumps."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.target = rng.uniform(-0.8, 0.8, size=2)

    def __call__(self, obs) -> np.ndarray:
        if self.rng.random() < 0.1:
            self.target = self.rng.uniform(-0.9, 0.9, size=2)
        self.target = np.clip(self.target + self.rng.normal(0, 0.08, size=2), -1, 1)
        return self.target.astype(np.float32)


class Poke:
    """Contact-heavy motion: pick a random point on the T's outline, go to a stand-off
    point outside it along the outward normal, push through it in a direction within
    45 degrees of the inward normal, repeat. Noise keeps the pushes diverse."""

    #: The T's outline in body coordinates: 8 corners in order.
    _OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120),
                         (-15, 30), (-60, 30)], dtype=np.float64)  # fmt: skip

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.noise_px = float(rng.uniform(1.0, 8.0))
        self.phase, self.left, self.point, self.normal = "aim", 0, None, None
        self.standoff, self.push_to = 30.0, None

    def _pick(self, block_pose: np.ndarray) -> None:
        v = self._OUTLINE
        edges = np.roll(v, -1, axis=0) - v
        length = np.linalg.norm(edges, axis=1)
        k = self.rng.choice(len(v), p=length / length.sum())
        local = v[k] + edges[k] * self.rng.random()
        normal = np.array([edges[k, 1], -edges[k, 0]]) / length[k]
        if point_in_outline(local + 2.0 * normal, v):  # keep it pointing out
            normal = -normal
        c, s = np.cos(block_pose[2]), np.sin(block_pose[2])
        rot = np.array([[c, -s], [s, c]])
        self.point = block_pose[:2] + rot @ local
        self.normal = rot @ normal
        self.standoff = self.rng.uniform(22, 45)
        self.phase, self.left = "aim", 6

    def _start_push(self) -> None:
        ang = self.rng.uniform(-np.pi / 4, np.pi / 4)
        c, s = np.cos(ang), np.sin(ang)
        direction = -(np.array([[c, -s], [s, c]]) @ self.normal)
        self.push_to = self.point + direction * self.rng.uniform(20, 90)
        self.phase, self.left = "push", int(self.rng.integers(2, 6))

    def __call__(self, obs) -> np.ndarray:
        block = np.asarray(obs["block_pose"], dtype=np.float64)
        agent = np.asarray(obs["agent_pos"], dtype=np.float64)
        if self.point is None:
            self._pick(block)
        if self.phase == "aim":
            stand = self.point + self.normal * self.standoff
            self.left -= 1
            if np.linalg.norm(agent - stand) < 12.0 or self.left < 0:
                self._start_push()
            target = stand
        if self.phase == "push":
            target = self.push_to
            self.left -= 1
            if self.left <= 0:
                self._pick(block)
        target = target + self.rng.normal(0.0, self.noise_px, size=2)
        return pusht.target_to_action(np.clip(target, 0.0, pusht.WORLD_SIZE))


class Jumps:
    """Fast moves and shoves, the actions a sampling planner (CEM, MPPI) tries: each
    frame's target is drawn around the pusher, the T's centre, or the last target, with a
    spread of 40-160 px per episode (CEM's first samples spread 128 px)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.spread = float(rng.uniform(40.0, 160.0))
        self.target: np.ndarray | None = None

    def __call__(self, obs) -> np.ndarray:
        agent = np.asarray(obs["agent_pos"], dtype=np.float64)
        block = np.asarray(obs["block_pose"], dtype=np.float64)
        u = self.rng.random()
        anchor = agent if (u < 0.5 or self.target is None) else block[:2] if u < 0.8 else self.target
        self.target = np.clip(anchor + self.rng.normal(0.0, self.spread, size=2), 0.0, pusht.WORLD_SIZE)
        return pusht.target_to_action(self.target)


class Planned:
    """An iCEM planner (pose objective) on its own copy of the simulator (or inside a
    learned model), re-synced to the real state before each action, with exploration
    noise on what it executes: with probability ``explore`` an action is perturbed by
    ``noise_px``, and now and then it is replaced by a jump, so the data holds the
    planner's path and its neighbourhood."""

    def __init__(self, rng: np.random.Generator, real: PushTSim, samples: int,
                 model_dir: str | None = None, *, prompt: str = "", seed: int = 0,
                 initial_state: np.ndarray | None = None):
        from agents.mpc import MPCAgent, MPCConfig
        from planners.icem import ICEMConfig

        self.rng, self.real = rng, real
        if model_dir is None:
            self.imagine = real.spawn()
            self.imagine.load_state(real.extract_state())
        else:
            from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero

            self.imagine = MiniDreamZero(weights_dir=model_dir)
            self.imagine.start(prompt, seed, initial_state)
        self.last_action: np.ndarray | None = None
        cfg = MPCConfig(planner="icem", objective="pose", record_tree=False,
                        icem=ICEMConfig(horizon=6, num_samples=samples, num_elites=4,
                                        iterations=2))  # fmt: skip
        self.agent = MPCAgent(self.imagine, cfg, rng)
        self.explore = float(rng.uniform(0.2, 0.6))
        self.noise_px = float(rng.uniform(4.0, 30.0))

    def __call__(self, obs) -> np.ndarray:
        self.last_action = self._act(obs)
        return self.last_action

    def _act(self, obs) -> np.ndarray:
        from experiments.plan import sync

        if self.last_action is not None:  # what was executed, and what really happened
            sync(self.imagine, self.real, self.last_action)
        action = self.agent.act()
        u = self.rng.random()
        if u < 0.05:  # a jump: where a sampling planner's worse candidates go
            target = np.asarray(obs["agent_pos"], np.float64) + self.rng.normal(0, 80.0, 2)
            return pusht.target_to_action(np.clip(target, 0.0, pusht.WORLD_SIZE))
        if u < self.explore:
            target = pusht.action_to_target(action) + self.rng.normal(0.0, self.noise_px, 2)
            return pusht.target_to_action(np.clip(target, 0.0, pusht.WORLD_SIZE))
        return np.asarray(action, dtype=np.float32)


def near_goal_start(rng: np.random.Generator, prompt: str, spread_px: float,
                    spread_rad: float) -> np.ndarray:
    """An ``initial_state`` with the T near the prompt's goal pose and the pusher 40-140 px
    from the T (outside it)."""
    goal = pusht.goal_pose(prompt)
    block = goal + np.array([*rng.normal(0.0, spread_px, 2), rng.normal(0.0, spread_rad)])
    block[:2] = np.clip(block[:2], 100.0, 412.0)
    keep_out = pusht.t_polygon(block).buffer(20.0)  # the T and the pusher's radius
    for _ in range(100):
        ang = rng.uniform(0, 2 * np.pi)
        agent = block[:2] + rng.uniform(40.0, 140.0) * np.array([np.cos(ang), np.sin(ang)])
        if np.all((agent > 20) & (agent < 492)) and not keep_out.contains(sg.Point(*agent)):
            break
    return pusht.state_for_pose(agent, block)


def point_in_outline(p: np.ndarray, poly: np.ndarray) -> bool:
    """Even-odd test of point ``p`` in polygon ``poly`` ``[N, 2]``."""
    inside = False
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        if (a[1] > p[1]) != (b[1] > p[1]):
            x = a[0] + (p[1] - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
            inside ^= bool(p[0] < x)
    return inside


def collect_episode(cfg: CollectConfig, index: int) -> dict[str, np.ndarray]:
    seed = cfg.seed + index
    rng = np.random.default_rng(seed)
    prompt_id = int(rng.integers(len(pusht.PROMPTS)))
    near_goal = bool(rng.random() < cfg.near_goal_fraction)
    # The policy: the first share (in this order) whose cumulative fraction exceeds u;
    # past them all, the scripted pusher.
    shares = np.cumsum([cfg.random_policy_fraction, cfg.poke_policy_fraction,
                        cfg.jump_policy_fraction, cfg.planner_policy_fraction])  # fmt: skip
    policy_id = (1, 2, 3, 4, 0)[int(np.searchsorted(shares, rng.random(), side="right"))]
    if policy_id == 1:
        policy = SmoothRandom(rng)
    elif policy_id == 2:
        policy = Poke(rng)
    elif policy_id == 3:
        policy = Jumps(rng)
    elif policy_id == 4:
        policy = None  # made below, once the simulator exists
    else:
        policy = ScriptedPusher(
            rng, noise_px=float(rng.uniform(2, 15)), waypoint_prob=float(rng.uniform(0.0, 0.06))
        )
    model = PushTSim(frame_size=cfg.frame_size, action_repeat=cfg.action_repeat)
    prompt = pusht.PROMPTS[prompt_id]
    init = (near_goal_start(rng, prompt, cfg.near_goal_px, cfg.near_goal_rad) if near_goal
            else None)  # fmt: skip
    obs, info = model.start(prompt, seed=seed, initial_state=init)
    if policy_id == 4:
        policy = Planned(rng, model, cfg.planner_samples, cfg.planner_model, prompt=prompt,
                         seed=seed, initial_state=init)
    T = cfg.frames
    out = {
        "frames": np.zeros((T, cfg.frame_size, cfg.frame_size, 3), np.uint8),
        "agent_pos": np.zeros((T, 2), np.float32),
        "block_pose": np.zeros((T, 3), np.float32),
        "actions": np.zeros((T - 1, 2), np.float32),
        "coverage": np.zeros(T, np.float32),
        "success": np.zeros(T, bool),
    }
    for t in range(T):
        out["frames"][t] = model.decode_frame(t)
        out["agent_pos"][t] = info["agent_pos"]
        out["block_pose"][t] = info["block_pose"]
        out["coverage"][t] = info["coverage"]
        out["success"][t] = info["is_success"]
        if t == T - 1:
            break
        action = policy(obs)
        out["actions"][t] = action
        step = model.step(action)
        obs, info = step.observation, step.info
    out["prompt_id"] = np.int64(prompt_id)
    out["policy_id"] = np.int64(policy_id)
    out["near_goal"] = np.bool_(near_goal)
    model.close()
    return out


def _worker(args) -> dict[str, np.ndarray]:
    # One torch thread per episode, in a pool or not: workers side by side would
    # oversubscribe the cores, and the same thread count makes the same bits either way.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return collect_episode(*args)
    finally:
        torch.set_num_threads(threads)


def collect(cfg: CollectConfig) -> Path:
    jobs = [(cfg, i) for i in range(cfg.episodes)]
    episodes = []
    # One worker runs in this process: no start-up cost, the same episodes.
    pool = mp.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else contextlib.nullcontext()
    with pool, tqdm(total=cfg.episodes, desc=f"collect {Path(cfg.out).stem}", unit="ep") as bar:
        for ep in pool.imap(_worker, jobs, chunksize=4) if cfg.workers > 1 else map(_worker, jobs):
            episodes.append(ep)
            bar.update(1)
    data = {k: np.stack([ep[k] for ep in episodes]) for k in episodes[0]}
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        np.savez(tmp, **data)
    return out


@hydra.main(version_base=None, config_path="../configs", config_name="collect")
def main(cfg) -> None:
    out = collect(CollectConfig(**OmegaConf.to_container(cfg, resolve=True)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
