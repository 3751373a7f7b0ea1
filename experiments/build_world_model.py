"""mini-dreamzero from nothing, in one command: collect the Push-T data, train every
network, fine-tune the state on the model's own plans (DAgger), measure the fidelity.

    python -m experiments.build_world_model                     # 92.0 min measured on 2 cores
    python -m experiments.build_world_model root=runs/wm2 seed=1
    python -m experiments.build_world_model steps.dynamics=2000 episodes.train=1000

Every phase is bounded by a number of episodes or optimiser steps, never by the clock,
so two runs with the same settings write the same bytes (the budgets below were sized
on this project's 2-core machine for 90 minutes; the last full run took 92). The phases, in order:

1. data (``experiments.collect``, all from pusht-sim): the contact-heavy mix, jumps (a
   sampling planner's far targets), near-goal starts, iCEM-driven episodes with the
   simulator as its model, and held-out episodes;
2. the VAE, 3. the state dynamics (the state token), 4. the state renderer, 5. the video
   dynamics (``experiments.train_world_model``'s stages);
6. DAgger, two rounds by default: iCEM planning *inside the weights as they are* drives
   more episodes, labelled by the real physics, and 7. the state dynamics is fine-tuned
   on them and on the rounds before;
8. ``experiments.evaluate_world_model`` on the held-out episodes.

A data file already in ``root/data`` with the same settings is reused (``reuse_data``), so
an interrupted run picks up after its last finished collection. Writes
``root/weights`` (a weights folder: ``backend.kwargs.weights_dir=`` of any app),
``root/eval`` (metrics.json / metrics.md, pictures), ``root/build.json`` (what each phase
did and how long it took) and TensorBoard runs under ``root/tb``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from arcfab_gym.atomic import write_atomic
from experiments.collect import CollectConfig, collect
from experiments.train_world_model import TrainConfig, train, weights_id, write_json


@dataclass
class Episodes:
    """Episodes of each data set."""

    train: int = 3000
    """The contact-heavy mix: 65 % pokes at the T, 25 % the scripted pusher, 10 % random."""
    jumps: int = 1500
    """Jumps: targets 40-160 px away, as a sampling planner's candidates."""
    near_goal: int = 1500
    """Starts with the T near its goal (pokes, jumps, random motion)."""
    planner: int = 64
    """Driven by iCEM with the simulator as its model, exploration noise on what it does."""
    dagger: list[int] = field(default_factory=lambda: [64, 128])
    """DAgger rounds: each drives this many episodes by iCEM inside the weights as they
    are, then fine-tunes the state on them (and on the rounds before)."""
    test: int = 100
    """Held out (the first mix, seed 1,000,000)."""


@dataclass
class Steps:
    """Optimiser steps of each training phase."""

    vae: int = 2400
    state: int = 11000
    renderer: int = 2000
    dynamics: int = 1000
    state_dagger: int = 4000
    """The state dynamics' fine-tune after each DAgger round."""


@dataclass
class BuildConfig:
    """Arguments of the one-command world-model build."""

    root: str = "runs/world_model"
    """Where everything goes: data/, weights/, eval/, tb/, build.json."""
    seed: int = 0
    """Seed of every training phase (the data sets have their own fixed seeds)."""
    episodes: Episodes = field(default_factory=Episodes)
    steps: Steps = field(default_factory=Steps)
    frames: int = 64
    """Frames per collected episode."""
    planner_copies: int = 4
    """How many times the planner-driven sets are repeated in the state's training mix
    (they are few, and they hold the states a planner visits)."""
    dagger_samples: int = 16
    """Samples of the DAgger planner's first iteration (horizon 6, 2 iterations)."""
    eval_episodes: int = 50
    """Held-out episodes the fidelity is measured on."""
    eval_horizons: list[int] = field(default_factory=lambda: [1, 4, 16])
    workers: int = 2
    """Collection processes."""
    threads: int = 2
    """torch CPU threads of the training phases."""
    reuse_data: bool = True
    """Keep a data file that a run with the same settings already wrote."""
    tiny: bool = False
    """Tiny networks on a slice of the data (tests, CI): the pipeline, not a model."""


ConfigStore.instance().store(name="build_world_model_schema", node=BuildConfig)


#: The data sets: policy mix and start distribution (experiments.collect's arguments) and
#: a fixed base seed each, apart from one another and from the held-out episodes.
_DATA: dict[str, dict[str, Any]] = {
    "train": dict(seed=0),
    "jumps": dict(seed=3000, random_policy_fraction=0.0, poke_policy_fraction=0.0,
                  jump_policy_fraction=1.0),
    "near_goal": dict(seed=6000, near_goal_fraction=1.0, poke_policy_fraction=0.6,
                      jump_policy_fraction=0.3, random_policy_fraction=0.1),
    "planner": dict(seed=5000, planner_policy_fraction=1.0, poke_policy_fraction=0.0,
                    random_policy_fraction=0.0, near_goal_fraction=0.5),
    "dagger": dict(seed=7000, planner_policy_fraction=1.0, poke_policy_fraction=0.0,
                   random_policy_fraction=0.0, near_goal_fraction=0.5),  # round k: + 1000 k
    "test": dict(seed=1_000_000),
}  # fmt: skip


class Build:
    """The phases of one build, each timed and recorded in ``build.json``."""

    def __init__(self, cfg: BuildConfig):
        counts = [v for k, v in asdict(cfg.episodes).items() if k != "dagger"] + list(cfg.episodes.dagger)
        if min(counts) < 1 or min(asdict(cfg.steps).values()) < 1:
            raise ValueError(f"every data set needs an episode and every phase a step: "
                             f"episodes={asdict(cfg.episodes)}, steps={asdict(cfg.steps)}")
        if cfg.eval_episodes > cfg.episodes.test:
            raise ValueError(f"eval_episodes={cfg.eval_episodes} is more than the "
                             f"{cfg.episodes.test} held-out episodes")
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.data_dir, self.weights = self.root / "data", self.root / "weights"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.root / "tb" / "build"))
        self.record: dict[str, Any] = {"config": asdict(cfg), "phases": []}
        self.t0 = time.perf_counter()

    def phase(self, name: str, run: Callable[[], dict | None]) -> None:
        i = len(self.record["phases"]) + 1
        print(f"\n[{i}] {name} (build at {(time.perf_counter() - self.t0) / 60:.1f} min)", flush=True)
        t = time.perf_counter()
        info = run() or {}
        minutes = (time.perf_counter() - t) / 60
        self.record["phases"].append({"phase": name, "minutes": round(minutes, 2), **info})
        self.record["minutes"] = round((time.perf_counter() - self.t0) / 60, 2)
        self.writer.add_scalar("build/phase_minutes", minutes, i)
        self.writer.add_scalar("build/elapsed_minutes", self.record["minutes"], i)
        write_json(self.root / "build.json", self.record)

    # --- data -------------------------------------------------------------------------
    def data(self, name: str) -> Path:
        return self.data_dir / f"{name}.npz"

    def collect(self, name: str, episodes: int, made_by: str | None = None, **settings) -> dict:
        """Collect one data set with ``experiments.collect``'s ``settings`` (``made_by``:
        the weights its planner imagines with, part of what a reused file must match)."""
        cfg = self.cfg
        ccfg = CollectConfig(episodes=episodes, frames=cfg.frames, workers=cfg.workers,
                             out=str(self.data(name)), **settings)  # fmt: skip
        recorded = self.data_dir / f"{name}.json"
        wanted = json.dumps({**asdict(ccfg), "made_by": made_by}, sort_keys=True)
        if cfg.reuse_data and self.data(name).exists() and recorded.exists() \
                and recorded.read_text() == wanted:
            return {"episodes": episodes, "reused": True}
        recorded.unlink(missing_ok=True)  # written only once its data file is complete
        collect(ccfg)
        write_atomic(recorded, wanted)
        return {"episodes": episodes, "reused": False}

    # --- training ---------------------------------------------------------------------
    def train(self, stage: str, steps: int, train_data, run_name: str | None = None,
              **extra) -> dict:
        cfg = self.cfg
        tcfg = TrainConfig(stage=stage, train_data=[str(p) for p in train_data],
                           test_data=str(self.data("test")), out_dir=str(self.weights),
                           minutes=None, max_steps=steps, seed=cfg.seed, threads=cfg.threads,
                           tiny=cfg.tiny, **extra)  # fmt: skip
        train(tcfg, self.root / "tb" / (run_name or stage))
        return {"steps": steps, "weights_id": self.weights_id()}

    def weights_id(self) -> str:
        return weights_id(self.weights)

    def run(self) -> dict:
        cfg = self.cfg
        for name in ("train", "jumps", "near_goal", "planner", "test"):
            self.phase(f"collect {name}", lambda n=name: self.collect(
                n, getattr(cfg.episodes, n), **_DATA[n]))
        planner = [self.data("planner")] * cfg.planner_copies
        base = [self.data("train"), self.data("jumps"), self.data("near_goal"), *planner]
        self.phase("train vae", lambda: self.train("vae", cfg.steps.vae, [self.data("train")]))
        self.phase("train state", lambda: self.train("state", cfg.steps.state, base))
        self.phase("train renderer", lambda: self.train(
            "renderer", cfg.steps.renderer,
            [self.data("train"), self.data("near_goal"), self.data("planner")]))
        self.phase("train dynamics", lambda: self.train("dynamics", cfg.steps.dynamics,
                                                        [self.data("train")]))
        dagger: list[Path] = []
        for k, episodes in enumerate(cfg.episodes.dagger, 1):
            name = "dagger" if k == 1 else f"dagger{k}"
            settings = {**_DATA["dagger"], "seed": _DATA["dagger"]["seed"] + 1000 * (k - 1),
                        "planner_samples": cfg.dagger_samples, "planner_model": str(self.weights)}
            self.phase(f"collect {name}", lambda n=name, e=episodes, s=settings: self.collect(
                n, e, made_by=self.weights_id(), **s))
            dagger += [self.data(name)] * cfg.planner_copies
            self.phase(f"fine-tune state on {name}", lambda n=name, d=list(dagger): self.train(
                "state", cfg.steps.state_dagger, [*base, *d], init_from=str(self.weights),
                lr=1e-3, run_name=f"state_{n}"))
        self.phase("evaluate", self.evaluate)
        self.writer.add_text("build", "```\n" + json.dumps(self.record, indent=1) + "\n```")
        self.writer.close()
        return self.record

    def evaluate(self) -> dict:
        from experiments.evaluate_world_model import EvalConfig, evaluate

        cfg = self.cfg
        metrics = evaluate(EvalConfig(weights_dir=str(self.weights), test_data=str(self.data("test")),
                                      episodes=cfg.eval_episodes, horizons=list(cfg.eval_horizons),
                                      threads=cfg.threads, out_dir=str(self.root / "eval")))  # fmt: skip
        summary = {f"{key}/k{h}": metrics["horizons"][str(h)][key]
                   for h in sorted(int(h) for h in metrics["horizons"]) for key in ("block_pos_err_px", "block_angle_err_rad",
                                                  "agent_pos_err_px", "frame_state_iou",
                                                  "psnr_anchored")}  # fmt: skip
        return {"fidelity": summary, "seconds": metrics["seconds"]}


def build(cfg: BuildConfig | dict) -> dict:
    if not isinstance(cfg, BuildConfig):
        cfg = dict(cfg)
        cfg = BuildConfig(**{**cfg, "episodes": Episodes(**cfg.get("episodes", {})),
                             "steps": Steps(**cfg.get("steps", {}))})  # fmt: skip
    return Build(cfg).run()


@hydra.main(version_base=None, config_path="../configs", config_name="build_world_model")
def main(cfg) -> None:
    record = build(OmegaConf.to_container(cfg, resolve=True))
    root = Path(cfg.root)
    print(f"\nbuilt in {record['minutes']:.1f} min")
    print((root / "eval" / "metrics.md").read_text())
    print(f"weights:     {root / 'weights'}  (backend.kwargs.weights_dir=... of any app)")
    print(f"record:      {root / 'build.json'}")
    print(f"TensorBoard: tensorboard --logdir {root / 'tb'}")


if __name__ == "__main__":
    main()
