"""The demo episode: one Push-T episode that branches.

It plays the scripted pusher for a while, checkpoints, forks two branches (one with a new
prompt, one with a new seed and a random policy), rewinds the main line and takes another
way, then writes what happened:

* ``tree.json``  -- the trajectory tree (``TrajectoryTree.from_json`` reads it back)
* ``tree.html``  -- a self-contained D3 page of the tree (open it in a browser)
* ``tb/``        -- a TensorBoard run: reward and coverage per branch, the branches' last
  frames side by side, a picture of the tree, and the store's memory

    python -m experiments.demo                       # defaults
    python -m experiments.demo seed=3 backend=pusht-sim fork_prompt="push the T up"
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import arcfab_gym  # noqa: F401 - registers the environments
from agents.scripted import ScriptedPusher
from arcfab_gym.atomic import write_atomic
from arcfab_gym.fabric.session import Session
from arcfab_gym.viz import figure_to_rgb, tree_figure, write_tree_html


@dataclass
class DemoConfig:
    """Arguments of the demo episode."""

    backend: str = "mini-dreamzero"
    """Registered world-model backend the episode runs in (pusht-sim: the simulator)."""
    prompt: str = "push the T onto the target"
    """Prompt of the main line."""
    fork_prompt: str = "push the T to the left"
    """Prompt of branch A (forked with a new prompt)."""
    fork_seed: int = 1234
    """Seed of branch B (forked with a new seed, driven by random actions)."""
    seed: int = 0
    """Reset seed of the episode (start state and policy noise)."""
    steps_before_fork: int = 30
    """Steps of the main line before the fork point."""
    branch_steps: int = 40
    """Steps of each branch after the fork point."""
    rewind_steps: int = 15
    """How far the main line rewinds before taking another way."""
    checkpoint_every: int = 5
    """Checkpoint each line every this many steps (tree nodes)."""


ConfigStore.instance().store(name="demo_schema", node=DemoConfig)


def drive(session: Session, policy, steps: int, every: int, writer: SummaryWriter, tag: str,
          bar: tqdm) -> None:
    """Step ``session`` with ``policy``, checkpoint every ``every`` steps, log to TB."""
    obs = session.observe()
    for k in range(1, steps + 1):
        obs, reward, terminated, _, info = session.step(policy(obs))
        writer.add_scalar(f"{tag}/reward", reward, session.frame_index)
        writer.add_scalar(f"{tag}/coverage", info["coverage"], session.frame_index)
        bar.update(1)
        if k % every == 0 or terminated:
            session.checkpoint(line=tag)
        if terminated:
            break


def run(cfg: DemoConfig, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out_dir / "tb"))
    env = gym.make("ArcFabric-v0", backend=cfg.backend, prompt=cfg.prompt, render_mode="rgb_array")
    env.reset(seed=cfg.seed)
    main = env.unwrapped.fabric
    rng = np.random.default_rng(cfg.seed)
    pusher = ScriptedPusher(rng)
    random_policy = lambda obs: rng.uniform(-1, 1, size=2).astype(np.float32)  # noqa: E731
    total = cfg.steps_before_fork + 3 * cfg.branch_steps + cfg.rewind_steps
    t0 = time.perf_counter()
    with tqdm(total=total, desc="demo episode", unit="step") as bar:
        drive(main, pusher, cfg.steps_before_fork, cfg.checkpoint_every, writer, "main", bar)
        fork_point = main.checkpoint(line="main", label="fork point")
        branch_a = main.fork(fork_point, new_prompt=cfg.fork_prompt)
        drive(branch_a, ScriptedPusher(np.random.default_rng(cfg.seed + 1)), cfg.branch_steps,
              cfg.checkpoint_every, writer, "branch_a_new_prompt", bar)
        branch_b = main.fork(fork_point, new_seed=cfg.fork_seed)
        drive(branch_b, random_policy, cfg.branch_steps, cfg.checkpoint_every, writer,
              "branch_b_new_seed", bar)
        drive(main, pusher, cfg.branch_steps, cfg.checkpoint_every, writer, "main", bar)
        rewound_to = main.rewind(min(cfg.rewind_steps, main.history_length))
        drive(main, random_policy, cfg.rewind_steps, cfg.checkpoint_every, writer,
              "main_after_rewind", bar)
    seconds = time.perf_counter() - t0

    tree = main.tree
    write_atomic(out_dir / "tree.json", tree.to_json(indent=1))
    write_tree_html(tree, out_dir / "tree.html", title=f"demo episode (seed {cfg.seed})")
    lines = {"main": main, "branch A (new prompt)": branch_a, "branch B (new seed)": branch_b}
    strip = np.concatenate([s.get_decoded_frame() for s in lines.values()], axis=1)
    writer.add_image("frames/last_frame_main_A_B", strip, 0, dataformats="HWC")
    writer.add_image("tree/picture", figure_to_rgb(tree_figure(tree, title="demo tree")), 0,
                     dataformats="HWC")
    stats = main.state_manager.stats()
    writer.add_scalar("store/memory_bytes", stats["memory_bytes"], 0)
    writer.add_scalar("store/checkpoints", stats["count"], 0)
    summary = {
        "out_dir": str(out_dir),
        "backend": cfg.backend,
        "frames": {name: s.frame_index for name, s in lines.items()},
        "rewound_to_checkpoint": rewound_to,
        "tree_nodes": len(tree),
        "fork_points": [n.node_id for n in tree.get_fork_points()],
        "leaves": len(tree.get_leaves()),
        "store": stats,
        "seconds": round(seconds, 3),
    }
    writer.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```", 0)
    writer.close()
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1))
    for s in (branch_a, branch_b):
        s.close()
    env.close()
    return summary


@hydra.main(version_base=None, config_path="../configs", config_name="demo")
def main(cfg) -> None:
    demo_cfg = DemoConfig(**OmegaConf.to_container(cfg, resolve=True))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run(demo_cfg, out_dir)
    print(json.dumps({k: summary[k] for k in ("frames", "tree_nodes", "leaves", "seconds")}))
    print(f"tree page:   {out_dir / 'tree.html'}")
    print(f"tree JSON:   {out_dir / 'tree.json'}")
    print(f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}")


if __name__ == "__main__":
    main()
