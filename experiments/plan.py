"""Plan inside a world model with fork and rewind, act in the real Push-T, log the trees.

For each episode: the real Push-T (pusht-sim, 4 control steps per action, 64 px frames)
and the planning model start from the same seeded state; every step the MPC agent plans
in the model (MCTS over relative moves, or CEM / MPPI over action sequences), the action
runs in the real world, and the model is re-synced from the real observation.

Writes under the run directory: ``results.json`` (per episode: return, final coverage,
success, planning time per action, search statistics), a TensorBoard run (the same as
curves, a picture of the search tree per episode, hparams), and ``trees/episode_<k>.html``
(a D3 page of each episode's search tree).

    python -m experiments.plan                                  # MCTS in mini-dreamzero
    python -m experiments.plan planner=cem backend=pusht_sim experiment=full
    python -m experiments.plan -m planner=mcts,cem,random hydra/launcher=joblib

(No ``from __future__ import annotations`` here: joblib workers rebuild the structured
config from the dataclasses' real annotations.)
"""


import dataclasses
import json
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.mpc import MPCAgent, MPCConfig
from arcfab_gym.atomic import write_atomic
from arcfab_gym.fabric.store import StateManager
from arcfab_gym.fabric.tree import TrajectoryTree
from arcfab_gym.models import create_world_model
from arcfab_gym.models.base import StepOutput
from arcfab_gym.models.pusht_sim import PushTSim
from arcfab_gym.tasks import pusht
from arcfab_gym.viz import figure_to_rgb, tree_figure, write_tree_html
from planners.cem import CEMConfig
from planners.icem import ICEMConfig, MPPIConfig
from planners.world import hypothesis_roots


@dataclass
class BackendConfig:
    name: str = "mini-dreamzero"
    """Registered backend to plan in."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Its constructor arguments."""


@dataclass
class PlannerConfig:
    planner: str = "mcts"
    """mcts, gumbel, cem, icem, mppi or random."""
    num_simulations: int = 32
    """MCTS simulations per action."""
    max_depth: int = 4
    """MCTS depth limit."""
    horizon: int = 5
    """CEM / iCEM / MPPI horizon."""
    num_samples: int = 32
    """CEM / iCEM / MPPI samples per iteration (iCEM: of the first)."""
    num_elites: int = 6
    """CEM / iCEM / MPPI elites."""
    iterations: int = 3
    """CEM / iCEM / MPPI iterations."""
    noise_beta: float = 2.0
    """iCEM: colour of the sampling noise along time (0 white, 2 smooth)."""
    keep_elites: float = 0.3
    """iCEM: fraction of elites kept between iterations and calls."""
    sample_decay: float = 1.25
    """iCEM: sample count shrinks by this factor per iteration."""
    execute: str = "best"
    """iCEM: the sequence acted on, best (best seen) or mean (the last iteration's mean)."""
    temperature: float = 0.5
    """MPPI: elite weights exp(temperature * (return - max))."""
    discount: float = 0.9
    """Planning discount."""
    pessimism: float = 0.0
    """Objective charged per px of the model's own disagreement about a step (its
    state-dynamics ensemble's spread); 0 = plan on the ensemble's mean alone."""
    hypotheses: int = 1
    """CEM / iCEM / MPPI: score each sequence by its mean return under this many of the
    model's ensemble members, each rolling out its own future (trajectory sampling);
    0 = all it holds (1 for pusht-sim)."""
    risk: float = 0.0
    """With hypotheses > 1: charge per standard deviation of the members' returns."""
    step_px: float = 40.0
    """MCTS move size (px)."""
    actions: str = "absolute"
    """CEM / iCEM / MPPI search space: absolute pusher targets or relative moves."""
    relative_px: float = 64.0
    """With actions=relative: the largest move per step (px)."""
    proposals: int = 0
    """MCTS: candidates per node from the model's action proposals (0: moves only)."""
    candidates: str = "moves"
    """MCTS candidates: moves (relative moves) or plan (warm-start plan + perturbations)."""
    num_candidates: int = 16
    """MCTS with candidates=plan: candidate slots per node."""
    perturb_std: float = 0.3
    """MCTS with candidates=plan: perturbation std (half-widths of the box)."""
    perturb_beta: float = 2.0
    """MCTS with candidates=plan: colour of the perturbations along time (0 white, 2 red)."""
    perturb_decay: float = 1.0
    """MCTS with candidates=plan: the perturbation std at depth d is std * decay**d."""
    plan_horizon: int = 6
    """MCTS: warm-start plan length (and rollout / absorbing-value horizon)."""
    plan_mass: float = 0.3
    """MCTS with candidates=plan: prior mass of the plan's step."""
    widening_c: float = 0.0
    """MCTS progressive widening ceil(c * N**alpha) (0: off)."""
    widening_alpha: float = 0.5
    """MCTS progressive widening exponent."""
    select: str = "visits"
    """MCTS action: visits (most visited root child) or best (best sequence seen)."""
    leaf_value: str = "hold"
    """MCTS leaf value: hold (r / (1 - discount)) or rollout (the plan's tail)."""

    def mpc(self, *, objective: str, record_tree: bool = True) -> MPCConfig:
        """The MPC agent's configuration for this planner."""
        seq = dict(horizon=self.horizon, num_samples=self.num_samples,
                   num_elites=self.num_elites, iterations=self.iterations)
        # Every field the agent's configuration shares with this one passes through.
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(MPCConfig)
                  if hasattr(self, f.name) and f.name not in ("cem", "icem", "mppi")}
        return MPCConfig(
            **shared, objective=objective, record_tree=record_tree,
            cem=CEMConfig(**seq),
            icem=ICEMConfig(**seq, noise_beta=self.noise_beta, keep_elites=self.keep_elites,
                            sample_decay=self.sample_decay, execute=self.execute),
            mppi=MPPIConfig(**seq, temperature=self.temperature),
        )  # fmt: skip


@dataclass
class ExperimentConfig:
    episodes: int = 2
    """Seeded episodes (seeds seed .. seed + episodes - 1)."""
    max_steps: int = 25
    """Real steps per episode (75 = gym-pusht's 30 s at 4 control steps per action)."""


@dataclass
class ParallelConfig:
    actors: int = 0
    """Ray actors the search is spread over (0: one process, no Ray; configs/parallel/)."""
    searches: int = 0
    """MCTS / Gumbel: independent root searches per action (0: one per actor)."""
    num_cpus: float = 1.0
    """CPUs each actor reserves."""
    max_retries: int = 1
    """Reruns of a search job whose actor died, before the error is raised."""


@dataclass
class PlanConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prompt: str = pusht.DEFAULT_PROMPT
    """Goal of the episodes."""
    seed: int = 0
    """First episode seed."""
    action_repeat: int = 4
    """Control steps per real action (must match the model's frames)."""
    tree_pages: bool = True
    """Write a D3 page of each episode's search tree."""
    objective: str = "reward"
    """Planning objective: reward (the backend's reward), shaped (+ distances) or pose
    (+ the T's keypoint distance to its goal; agents/objectives.py)."""
    audit_plans: bool = True
    """Also audit each chosen plan: the model's predicted reward over the whole planned
    sequence vs the real Push-T's for the same sequence from the same state."""


cs = ConfigStore.instance()
cs.store(name="plan_schema", node=PlanConfig)


def sync(model, real: PushTSim, action: np.ndarray) -> StepOutput:
    """Bring the planning model back in step with the real world after ``action``.

    Returns what the model *predicted* for ``action`` from the state it was in (its
    reward, observation), for the predicted-vs-real audit."""
    predicted = model.step(action)
    if isinstance(model, PushTSim):
        model.load_state(real.extract_state())  # the simulator is exact: copy the state
    else:  # replace the prediction by what really happened
        obs = real.observe()
        model.resync(frame=real.decode_frame(real.frame_count - 1),
                     agent_pos=obs["agent_pos"].astype(np.float64),
                     block_pose=obs["block_pose"].astype(np.float64))
    return predicted


def plan_returns(model, real: PushTSim, scratch: PushTSim, plan: np.ndarray, *,
                 hypotheses: int = 1) -> tuple[float, float, float, float]:
    """What ``model`` promises for ``plan`` from its current state and what the real
    Push-T pays for the same actions from the real state (on ``scratch``, a copy): the
    summed reward and the coverage after the plan's last action, each as (promised,
    paid, promised coverage, paid coverage); both worlds left as they were. With
    ``hypotheses > 1`` the promise is the mean over the model's first ``hypotheses``
    hypotheses, as the planner scored it. The model's sampling RNG travels with its
    state, so auditing a plan changes nothing that follows."""
    def follow(world) -> tuple[float, float]:  # summed reward, coverage after the last action
        outs = [world.step(a) for a in plan]
        return sum(float(o.reward) for o in outs), float(outs[-1].info["coverage"]) if outs else 0.0

    root = model.extract_state()
    promises = []
    for state in hypothesis_roots(model, root, hypotheses):
        model.load_state(state)
        promises.append(follow(model))
    promised, promised_cov = np.mean(promises, axis=0).tolist()
    model.load_state(root)
    scratch.load_state(real.extract_state())
    paid, paid_cov = follow(scratch)
    return promised, paid, promised_cov, paid_cov


def run_episode(cfg: PlanConfig, model, episode: int, writer: SummaryWriter, out_dir: Path,
                bar: tqdm, pool=None) -> dict[str, Any]:
    seed = cfg.seed + episode
    rng = np.random.default_rng(seed)
    init = pusht.sample_initial_state(rng)
    real = PushTSim(action_repeat=cfg.action_repeat, frame_size=64)
    _, start_info = real.start(cfg.prompt, seed, init)
    start_cov = float(start_info["coverage"])
    writer.add_scalar(f"coverage/episode_{episode}", start_cov, 0)
    scratch = real.spawn()  # replays planned sequences for the plan audit
    model.start(cfg.prompt, seed, init)
    p = cfg.planner
    store = StateManager(model)
    tree = TrajectoryTree(store=store)
    if pool is None:
        agent = MPCAgent(model, p.mpc(objective=cfg.objective), rng, tree=tree)
    else:  # parallel=ray: the search on Ray actors (planners/parallel.py)
        from agents.parallel import ParallelMPCAgent

        agent = ParallelMPCAgent(model, p.mpc(objective=cfg.objective), rng, tree=tree,
                                 pool=pool, searches=cfg.parallel.searches)  # fmt: skip
    plan_times, stats_log, cov, success = [], [], 0.0, False
    rewards: list[float] = []  # real, per step
    predicted: list[float] = []  # the model's, for the same executed actions
    promised, paid = [], []  # per step: the whole chosen plan, in the model and for real
    promised_cov, paid_cov = [], []  # and the coverage it ends with
    for t in range(cfg.experiment.max_steps):
        action = agent.act()
        plan_times.append(agent.stats.get("planning_seconds", 0.0))
        stats_log.append(dict(agent.stats))
        if cfg.audit_plans:
            for log, value in zip((promised, paid, promised_cov, paid_cov),
                                  plan_returns(model, real, scratch, agent.plan,
                                               hypotheses=agent.hypotheses)):
                log.append(value)
        out = real.step(action)
        cov, success = out.info["coverage"], out.info["is_success"]
        writer.add_scalar(f"coverage/episode_{episode}", cov, t + 1)
        rewards.append(float(out.reward))
        predicted.append(float(sync(model, real, action).reward))
        bar.update(1)
        bar.set_postfix(ep=episode, cov=f"{cov:.2f}")
        if out.terminated:
            break
    ret = sum(rewards)
    result = {
        "episode": episode, "seed": seed, "return": ret, "start_coverage": start_cov,
        "final_coverage": cov,
        "success": bool(success), "steps": t + 1,
        "seconds_per_action": statistics.mean(plan_times),
        "model_steps_per_action": statistics.mean(s.get("model_steps", 0) for s in stats_log),
        "tree_nodes": len(tree), "store_bytes": store.memory_bytes,
        # The exploitation audit: what the model promised for the executed actions (one
        # step ahead, from the re-synced state) vs what the real world paid.
        "predicted_return": float(sum(predicted)), "return_gap": float(sum(predicted) - ret),
        "rewards": rewards, "predicted_rewards": predicted,
    }  # fmt: skip
    if cfg.audit_plans:
        # The plan audit: each chosen plan's return as the model promised it vs as the
        # real world pays it, from the same state (the planner's own exploitation).
        # And in coverage: what each plan promised the T's coverage would be at its end.
        result.update({"plan_promised_returns": promised, "plan_real_returns": paid,
                       "plan_return_gap": statistics.mean(a - b for a, b in zip(promised, paid)),
                       "plan_promised_final_coverage": promised_cov,
                       "plan_real_final_coverage": paid_cov,
                       "plan_final_coverage_gap": statistics.mean(
                           a - b for a, b in zip(promised_cov, paid_cov))})  # fmt: skip
    for key in ("root_visits", "depth", "q_spread"):
        vals = [s[key] for s in stats_log if key in s]
        if vals:
            result[f"mean_{key}"] = statistics.mean(vals)
    for k, v in result.items():
        if isinstance(v, (int, float)) and k not in ("episode", "seed"):
            writer.add_scalar(f"episode/{k}", float(v), episode)
    if len(tree):
        writer.add_image("search/tree", figure_to_rgb(tree_figure(tree, color_by="value",
                         title=f"episode {episode}")), episode, dataformats="HWC")
        if cfg.tree_pages:
            write_tree_html(tree, out_dir / "trees" / f"episode_{episode}.html",
                            title=f"{p.planner} in {model.name}, episode {episode}",
                            color_by="value")
    store.close()
    scratch.close()
    real.close()
    return result


def run(cfg: PlanConfig, out_dir: Path) -> dict[str, Any]:
    for name in ("episodes", "max_steps"):
        if getattr(cfg.experiment, name) < 1:
            raise ValueError(f"experiment.{name} must be >= 1, got {getattr(cfg.experiment, name)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out_dir / "tb"))
    model = create_world_model(cfg.backend.name, **cfg.backend.kwargs)
    results = []
    total = cfg.experiment.episodes * cfg.experiment.max_steps
    t0 = time.perf_counter()
    pool = None
    if cfg.parallel.actors > 0:  # Ray only here, never on the default path
        from planners.parallel import WorkerPool

        pool = WorkerPool(cfg.backend.name, cfg.backend.kwargs, actors=cfg.parallel.actors,
                          num_cpus=cfg.parallel.num_cpus, max_retries=cfg.parallel.max_retries)
    try:
        with tqdm(total=total, desc=f"{cfg.planner.planner} in {cfg.backend.name}",
                  unit="step") as bar:  # fmt: skip
            for k in range(cfg.experiment.episodes):
                results.append(run_episode(cfg, model, k, writer, out_dir, bar, pool=pool))
    finally:
        if pool is not None:
            pool.close()
    summary = {
        "planner": cfg.planner.planner, "backend": cfg.backend.name,
        "episodes": len(results),
        "success_rate": statistics.mean(r["success"] for r in results),
        "mean_final_coverage": statistics.mean(r["final_coverage"] for r in results),
        "mean_return": statistics.mean(r["return"] for r in results),
        "seconds_per_action": statistics.mean(r["seconds_per_action"] for r in results),
        "mean_return_gap": statistics.mean(r["return_gap"] for r in results),
        "mean_plan_return_gap": (statistics.mean(r["plan_return_gap"] for r in results)
                                 if cfg.audit_plans else None),
        "mean_plan_final_coverage_gap": (statistics.mean(r["plan_final_coverage_gap"] for r in results)
                                         if cfg.audit_plans else None),
        "wall_seconds": time.perf_counter() - t0,
        "actors": cfg.parallel.actors,
    }  # fmt: skip
    hparams = {"planner": cfg.planner.planner, "backend": cfg.backend.name,
               "num_simulations": cfg.planner.num_simulations, "horizon": cfg.planner.horizon,
               "max_steps": cfg.experiment.max_steps}  # fmt: skip
    writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in summary.items()
                                 if isinstance(v, float)}, run_name=".")  # fmt: skip
    writer.close()
    doc = {"summary": summary, "config": _config_dict(cfg),
           "episodes": results}  # fmt: skip
    write_atomic(out_dir / "results.json", json.dumps(doc, indent=1))
    return doc


def _config_dict(cfg: Any) -> Any:
    """The config as plain data, read from the instances' ``__dict__``: a launcher that
    pickles this ``__main__`` by value (submitit, under the cloudpickle < 3 that
    hydra-ray-launcher pins) rebuilds the dataclasses with fields that ``dataclasses.fields``
    and OmegaConf no longer recognise, and the config came out ``{}``."""
    if hasattr(cfg, "__dataclass_fields__"):
        return {k: _config_dict(v) for k, v in vars(cfg).items()}
    if isinstance(cfg, dict):
        return {k: _config_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_config_dict(v) for v in cfg]
    return cfg


def episode_table(doc: dict[str, Any]) -> str:
    """Per episode: the T's coverage of its goal at the start and at the end, in the real
    Push-T, and whether it succeeded."""
    lines = ["episode  seed  start coverage  final coverage  success  actions"]
    for r in doc["episodes"]:
        lines.append(f"{r['episode']:>7}  {r['seed']:>4}  {r['start_coverage']:>14.3f}  "
                     f"{r['final_coverage']:>14.3f}  {'yes' if r['success'] else 'no':>7}  "
                     f"{r['steps']:>7}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../configs", config_name="plan")
def main(cfg) -> None:
    plan_cfg = OmegaConf.to_object(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    doc = run(plan_cfg, out_dir)
    print(json.dumps(doc["summary"], indent=1))
    print(episode_table(doc))
    print(f"results: {out_dir / 'results.json'}   TensorBoard: tensorboard --logdir {out_dir / 'tb'}")


if __name__ == "__main__":
    main()
