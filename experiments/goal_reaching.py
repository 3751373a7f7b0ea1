"""Goal-reaching on Push-T, stable-worldmodel's protocol with our own expert trajectories.

Each episode starts at a state of an expert trajectory (the scripted pusher, seeded, one
decision per control step) and must reach the expert's state ``goal_offset`` control
steps later within ``budget`` control steps; success means the pusher's and the T's
position errors together (L2 over the four numbers) within 20 px and the T's angle
within pi/9. As in
stable-worldmodel, offset and budget count environment (control) steps; the planner acts
every ``action_repeat`` of them (the model's frame), and success is checked after each
action (so a pass in the middle of an action is missed). The planner's cost is the
terminal pose distance (``objective=pose``, default: the T's keypoint distance to the
goal's T and the pusher's distance to the goal's pusher, read from the model's predicted
state) or the distance in the model's own embedding space (``objective=embedding``,
DINO-WM's cost: the latent for mini-dreamzero, the physical state for pusht-sim).

    python -m experiments.goal_reaching backend=pusht_sim planner=cem episodes=50
    python -m experiments.goal_reaching backend=mini_dreamzero planner=cem episodes=50

(No postponed annotations: Hydra's joblib workers rebuild the dataclasses.)
"""

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm import tqdm

from agents.mpc import MPCAgent
from arcfab_gym.atomic import write_atomic
from arcfab_gym.models import create_world_model
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from experiments.collect import CollectConfig, collect_episode
from experiments.plan import BackendConfig, PlannerConfig, sync

POSITION_TOLERANCE_PX = 20.0
ANGLE_TOLERANCE = math.pi / 9


@dataclass
class GoalReachingConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    episodes: int = 10
    """Start/goal pairs (seeded)."""
    goal_offset: int = 25
    """Goal = the expert's state this many control steps after the start."""
    budget: int = 50
    """Control steps allowed to reach the goal (rounded up to whole actions)."""
    action_repeat: int = 4
    """Control steps per planned action (the model's frame)."""
    seed: int = 0
    """First seed (expert trajectory seed + episode)."""
    objective: str = "pose"
    """pose (terminal pose distance, from the predicted state) or embedding."""


ConfigStore.instance().store(name="goal_reaching_schema", node=GoalReachingConfig)


def goal_errors(info: dict[str, Any], goal_agent: np.ndarray, goal_block: np.ndarray) -> dict:
    """Pusher and T position errors (px) and the T's angle error (rad) against the goal."""
    return {"agent_err_px": float(np.linalg.norm(info["agent_pos"] - goal_agent)),
            "block_err_px": float(np.linalg.norm(info["block_pose"][:2] - goal_block[:2])),
            "angle_err_rad": float(pusht.wrap_angle(info["block_pose"][2] - goal_block[2]))}  # fmt: skip


def reached(info: dict[str, Any], goal_agent: np.ndarray, goal_block: np.ndarray) -> bool:
    err = goal_errors(info, goal_agent, goal_block)
    # stable-worldmodel's rule: the L2 norm over the four numbers (pusher x, y and T x, y
    # errors) within 20 px, and the angle within pi/9.
    position = math.hypot(err["agent_err_px"], err["block_err_px"])
    return position < POSITION_TOLERANCE_PX and err["angle_err_rad"] < ANGLE_TOLERANCE


def run(cfg: GoalReachingConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.objective not in ("pose", "embedding"):
        raise ValueError(f"objective must be pose or embedding, got {cfg.objective!r}")
    for name in ("episodes", "goal_offset", "budget", "action_repeat"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = create_world_model(cfg.backend.name, **cfg.backend.kwargs)
    scratch = model.spawn()
    p = cfg.planner
    frames = cfg.goal_offset + 40
    n_actions = -(-cfg.budget // cfg.action_repeat)
    results = []
    t0 = time.perf_counter()
    for k in tqdm(range(cfg.episodes), desc=f"goal reaching, {p.planner} in {model.name}"):
        seed = cfg.seed + k
        expert = collect_episode(CollectConfig(frames=frames, random_policy_fraction=0.0,
                                               frame_size=64, action_repeat=1), seed)  # fmt: skip
        rng = np.random.default_rng(seed)
        s = int(rng.integers(0, frames - cfg.goal_offset))
        g = s + cfg.goal_offset
        prompt = pusht.PROMPTS[int(expert["prompt_id"])]
        start = pusht.state_for_pose(expert["agent_pos"][s], expert["block_pose"][s])
        goal = pusht.state_for_pose(expert["agent_pos"][g], expert["block_pose"][g])
        real = PushTSim(action_repeat=cfg.action_repeat, frame_size=64)
        real.start(prompt, seed, start)
        model.start(prompt, seed, start)
        scratch.start(prompt, seed, goal)
        agent = MPCAgent(model, p.mpc(objective="goal", record_tree=False), rng)
        goal_agent = expert["agent_pos"][g].astype(np.float64)
        goal_block = expert["block_pose"][g].astype(np.float64)
        if cfg.objective == "pose":
            agent.set_goal_pose(goal_agent, goal_block)
        else:
            agent.set_goal(scratch.extract_state())
        success, times = False, []
        for step in range(n_actions):
            action = agent.act()
            times.append(agent.stats["planning_seconds"])
            out = real.step(action)
            if reached(out.info, goal_agent, goal_block):
                success = True
                break
            sync(model, real, action)
        start_err = goal_errors({"agent_pos": expert["agent_pos"][s],
                                 "block_pose": expert["block_pose"][s]}, goal_agent, goal_block)
        results.append({"episode": k, "seed": seed, "start": s, "success": success,
                        "start_errors": start_err,
                        "final_errors": goal_errors(out.info, goal_agent, goal_block),
                        "control_steps": (step + 1) * cfg.action_repeat,
                        "seconds_per_action": statistics.mean(times)})
        real.close()
    summary = {
        "planner": p.planner, "backend": model.name, "episodes": len(results),
        "success_rate": statistics.mean(r["success"] for r in results),
        "seconds_per_action": statistics.mean(r["seconds_per_action"] for r in results),
        "objective": cfg.objective, "goal_offset": cfg.goal_offset, "budget": cfg.budget, "action_repeat": cfg.action_repeat,
        "wall_seconds": time.perf_counter() - t0,
        "protocol": "stable-worldmodel Push-T goal reaching; start/goal pairs from this "
                    "project's scripted-pusher trajectories; offset and budget in control steps",
    }  # fmt: skip
    doc = {"summary": summary, "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
           "episodes": results}
    write_atomic(out_dir / "results.json", json.dumps(doc, indent=1))
    return doc


@hydra.main(version_base=None, config_path="../configs", config_name="goal_reaching")
def main(cfg) -> None:
    doc = run(OmegaConf.to_object(cfg), Path(HydraConfig.get().runtime.output_dir))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
