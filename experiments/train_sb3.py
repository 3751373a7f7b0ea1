"""Train stable-baselines3 agents inside a world model; score them in the real Push-T.

The agent (PPO, or SAC for the continuous action) learns in ``ArcFabric-v0`` over the
chosen backend, ``mini-dreamzero`` by default, through SB3's vectorized envs
(``make_vec_env``, ``DummyVecEnv`` or ``SubprocVecEnv``). Every ``eval_freq`` steps, and
once before training, the policy plays seeded episodes in the real Push-T (pusht-sim, 4
control steps per action like the model's frames) with the observation the real world
gives. Training the same budget with ``world=pusht-sim`` is the reference: how far the
same agent gets when its world is exact.

After training, the model-exploitation audit: the policy plays whole episodes inside its
training world, and the actions it chose are replayed open loop in the real Push-T from
the same seeded start. The predicted and the real coverage return are compared, and
episodes whose predicted return exceeds the real one by ``audit_margin`` are flagged
(``python -m experiments.audit <run>/audit.json`` prints it again).

Writes under the run directory: ``results.json`` (config, evaluations, audit summary),
``audit.json``, ``model.zip`` (SB3's format) and a TensorBoard run with SB3's own tags
(``rollout/*``, ``train/*``, ``time/*``, ``eval/*``) plus ``eval/final_coverage``,
``rollout/ep_coverage_mean`` and ``audit/*``.

    python -m experiments.train_sb3                                  # PPO in mini-dreamzero
    python -m experiments.train_sb3 algo=sac world=pusht-sim         # the reference
    python -m experiments.train_sb3 -m algo=ppo,sac world=mini-dreamzero,pusht-sim
    python -m experiments.train_sb3 vec_env=subproc n_envs=2 +algo_kwargs.learning_rate=1e-3
"""


import inspect
import json
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from tqdm import tqdm

import arcfab_gym  # noqa: F401  (registers ArcFabric-v0)
from arcfab_gym.atomic import write_atomic
from arcfab_gym.envs import PushTFeatures, PushTReward, RelativeTargets
from arcfab_gym.models import list_world_models
from experiments.audit import audit as audit_report
from experiments.audit import format_audit

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "sac": SAC}
#: Sized for budgets of tens of thousands of steps: PPO updates every n_envs x 256 steps
#: (SB3's 2048 would give a 20k-step run two updates); SAC trains every step from 1k on.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"n_steps": 256, "batch_size": 256, "n_epochs": 10, "gamma": 0.98,
            "learning_rate": 3e-4},
    "sac": {"learning_starts": 1_000, "batch_size": 256, "gamma": 0.98,
            "learning_rate": 3e-4, "buffer_size": 100_000},
}  # fmt: skip
VEC_ENVS = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}
ACTION_MODES = ("relative", "absolute")
#: Held-out seeds: the world-model data used 0..3999 and the test set 1e6..
EVAL_SEED = 2_000_000
AUDIT_SEED = 3_000_000


@dataclass
class TrainSB3Config:
    algo: str = "ppo"
    """ppo or sac."""
    world: str = "mini-dreamzero"
    """The backend the agent trains in (pusht-sim: the exact-simulator reference)."""
    world_kwargs: dict[str, Any] = field(default_factory=dict)
    """Its constructor arguments, e.g. +world_kwargs.weights_dir=runs/weights."""
    reward: str = "shaped"
    """coverage (the task's own) or shaped (coverage plus progress terms)."""
    actions: str = "relative"
    """relative (move the pusher up to max_step_px from where it is) or absolute (the
    env's own: a target anywhere on the table)."""
    max_step_px: float = 48.0
    total_timesteps: int = 20_000
    n_envs: int = 4
    vec_env: str = "dummy"
    """dummy (one process) or subproc (one process per env)."""
    seed: int = 0
    max_steps: int = 75
    """Actions per episode (75 x 4 control steps = gym-pusht's 300)."""
    action_repeat: int = 4
    """Control steps per action in the real Push-T (mini-dreamzero's frames hold 4)."""
    eval_freq: int = 5_000
    """Evaluate in the real Push-T every this many training steps (all envs together)."""
    eval_episodes: int = 10
    audit_episodes: int = 10
    audit_margin: float = 0.5
    """Flag an audited episode when predicted - real coverage return exceeds this."""
    torch_threads: int = 1
    """Threads per process (the learner's and each subprocess env's)."""
    algo_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides of ALGORITHM_DEFAULTS, e.g. +algo_kwargs.learning_rate=1e-3."""


ConfigStore.instance().store(name="train_sb3_schema", node=TrainSB3Config)


def check_config(cfg: TrainSB3Config) -> None:
    """Refuse a config that would fail later or silently do nothing."""
    if cfg.algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {sorted(ALGORITHMS)}, got {cfg.algo!r}")
    if cfg.world not in list_world_models():
        raise ValueError(f"world must be a registered backend {list_world_models()}, "
                         f"got {cfg.world!r}")
    if cfg.reward not in PushTReward.KINDS:
        raise ValueError(f"reward must be one of {PushTReward.KINDS}, got {cfg.reward!r}")
    if cfg.actions not in ACTION_MODES:
        raise ValueError(f"actions must be one of {ACTION_MODES}, got {cfg.actions!r}")
    if not cfg.max_step_px > 0:
        raise ValueError(f"max_step_px must be > 0, got {cfg.max_step_px}")
    if cfg.vec_env not in VEC_ENVS:
        raise ValueError(f"vec_env must be one of {sorted(VEC_ENVS)}, got {cfg.vec_env!r}")
    for name in ("total_timesteps", "n_envs", "max_steps", "action_repeat", "eval_freq",
                 "torch_threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_episodes", "audit_episodes"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.audit_margin < 0:
        raise ValueError(f"audit_margin must be >= 0, got {cfg.audit_margin}")
    unknown = set(cfg.algo_kwargs) - set(inspect.signature(ALGORITHMS[cfg.algo]).parameters)
    if unknown:
        raise ValueError(f"algo_kwargs {sorted(unknown)} are not arguments of "
                         f"{ALGORITHMS[cfg.algo].__name__}")


# --- environments ----------------------------------------------------------------------------
def make_env(world: str, reward: str, max_steps: int, action_repeat: int = 4, *,
             relative_px: float | None = None, world_kwargs: dict[str, Any] | None = None,
             torch_threads: int | None = None) -> gym.Env:
    """``ArcFabric-v0`` over ``world``, with the chosen reward and the flat features an
    ``MlpPolicy`` reads; actions relative to the pusher (up to ``relative_px``) or, with
    ``None``, the env's absolute targets. The real Push-T (``pusht-sim``) holds each
    action for ``action_repeat`` control steps, as mini-dreamzero's frames do."""
    if torch_threads is not None:  # in a SubprocVecEnv worker
        torch.set_num_threads(torch_threads)
    backend_kwargs = dict(world_kwargs or {})
    if world == "pusht-sim":
        backend_kwargs = {"action_repeat": action_repeat, "frame_size": 64, **backend_kwargs}
    env = gym.make("ArcFabric-v0", backend=world, max_episode_frames=max_steps,
                   backend_kwargs=backend_kwargs)
    if relative_px is not None:
        env = RelativeTargets(env, max_step_px=relative_px)
    return PushTFeatures(PushTReward(env, reward))


def _relative_px(cfg: TrainSB3Config) -> float | None:
    return cfg.max_step_px if cfg.actions == "relative" else None


def world_env(cfg: TrainSB3Config, *, torch_threads: int | None = None) -> gym.Env:
    """One env of the world the agent trains (and imagines) in."""
    return make_env(cfg.world, cfg.reward, cfg.max_steps, cfg.action_repeat,
                    relative_px=_relative_px(cfg), world_kwargs=cfg.world_kwargs,
                    torch_threads=torch_threads)


def real_env(cfg: TrainSB3Config, *, absolute: bool = False) -> gym.Env:
    """The world a policy is scored in, whatever it trained in (with ``absolute``: taking
    the env's own absolute actions, for replaying the ones a policy's actions became)."""
    return make_env("pusht-sim", cfg.reward, cfg.max_steps, cfg.action_repeat,
                    relative_px=None if absolute else _relative_px(cfg))


def training_envs(cfg: TrainSB3Config):
    threads = cfg.torch_threads if cfg.vec_env == "subproc" else None
    factory = partial(world_env, cfg, torch_threads=threads)
    return make_vec_env(factory, n_envs=cfg.n_envs, seed=cfg.seed,
                        vec_env_cls=VEC_ENVS[cfg.vec_env],
                        monitor_kwargs={"info_keywords": ("coverage",)})


# --- evaluation in the real world ------------------------------------------------------------
def play(policy: Callable[[np.ndarray], np.ndarray], env: gym.Env, seed: int,
         actions: np.ndarray | None = None) -> dict[str, Any]:
    """One episode from ``env.reset(seed=seed)``: closed loop with ``policy``, or open
    loop replaying ``actions`` (stopping early if the episode ends first). Records the
    actions the env applied (``info["applied_action"]`` where a wrapper translated them)."""
    obs, _ = env.reset(seed=seed)
    taken, rewards, coverage_rewards, coverage = [], [], [], 0.0
    for t in range(env.spec.max_episode_steps if actions is None else len(actions)):
        action = policy(obs) if actions is None else actions[t]
        obs, reward, terminated, truncated, info = env.step(action)
        taken.append(np.asarray(info.get("applied_action", action), dtype=np.float64).tolist())
        rewards.append(float(reward))
        coverage_rewards.append(info["coverage_reward"])
        coverage = float(info["coverage"])
        if terminated or truncated:
            break
    return {"seed": seed, "actions": taken, "rewards": rewards,
            "coverage_rewards": coverage_rewards, "final_coverage": coverage,
            "success": bool(terminated)}  # fmt: skip


def deterministic_policy(model: BaseAlgorithm) -> Callable[[np.ndarray], np.ndarray]:
    return lambda obs: model.predict(obs, deterministic=True)[0]


def evaluate(model: BaseAlgorithm, env: gym.Env, episodes: int) -> dict[str, float]:
    """SB3's eval tags (``mean_reward``, ``mean_ep_length``, ``success_rate``) plus the
    task's return and the final coverage, over seeded episodes in ``env``."""
    runs = [play(deterministic_policy(model), env, EVAL_SEED + k) for k in range(episodes)]
    return {
        "mean_reward": statistics.mean(sum(r["rewards"]) for r in runs),
        "mean_ep_length": statistics.mean(len(r["rewards"]) for r in runs),
        "success_rate": statistics.mean(r["success"] for r in runs),
        "mean_coverage_return": statistics.mean(sum(r["coverage_rewards"]) for r in runs),
        "final_coverage": statistics.mean(r["final_coverage"] for r in runs),
    }


class RealWorldEval(BaseCallback):
    """Evaluate in the real Push-T before training and every ``eval_freq`` steps; log
    under ``eval/`` and keep the history for ``results.json``. Also logs the episodes'
    final coverage inside the training world as ``rollout/ep_coverage_mean``."""

    def __init__(self, env: gym.Env, *, eval_freq: int, episodes: int, bar: tqdm):
        super().__init__()
        self.env, self.eval_freq, self.episodes, self.bar = env, eval_freq, episodes, bar
        self.history: list[dict[str, float]] = []
        self._next = 0

    def _on_training_start(self) -> None:
        self._evaluate()

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        if self.num_timesteps >= self._next:
            self._evaluate()
        return True

    def _on_rollout_end(self) -> None:
        covs = [ep["coverage"] for ep in self.model.ep_info_buffer if "coverage" in ep]
        if covs:
            self.logger.record("rollout/ep_coverage_mean", float(np.mean(covs)))

    def _on_training_end(self) -> None:
        if not self.history or self.history[-1]["timesteps"] != self.num_timesteps:
            self._evaluate()

    def _evaluate(self) -> None:
        self._next = self.num_timesteps + self.eval_freq
        if self.episodes == 0:
            return
        t0 = time.perf_counter()
        scores = evaluate(self.model, self.env, self.episodes)
        for key, value in scores.items():
            self.logger.record(f"eval/{key}", value)
        self.logger.record("time/eval_seconds", time.perf_counter() - t0)
        self.logger.dump(self.num_timesteps)
        self.history.append({"timesteps": self.num_timesteps, **scores})
        self.bar.set_postfix(real_coverage=f"{scores['final_coverage']:.3f}")


# --- the audit -------------------------------------------------------------------------------
def audit_policy(model: BaseAlgorithm, cfg: TrainSB3Config, episodes: int) -> dict[str, Any]:
    """Play whole episodes inside the training world, replay the actions the model's env
    applied (absolute targets) open loop in the real Push-T from the same seeded start; the document ``experiments.audit``
    reads (``rewards`` real, ``predicted_rewards`` imagined, both the task's coverage)."""
    imagined_env = world_env(cfg)
    real = real_env(cfg, absolute=True)
    rows = []
    try:
        for k in range(episodes):
            seed = AUDIT_SEED + k
            imagined = play(deterministic_policy(model), imagined_env, seed)
            replayed = play(None, real, seed, actions=np.asarray(imagined["actions"]))
            rows.append({"episode": k, "seed": seed, "actions": imagined["actions"],
                         "rewards": replayed["coverage_rewards"],
                         "predicted_rewards": imagined["coverage_rewards"],
                         "final_coverage": replayed["final_coverage"],
                         "predicted_final_coverage": imagined["final_coverage"]})  # fmt: skip
    finally:
        imagined_env.close()
        real.close()
    return {"summary": {"backend": cfg.world, "planner": f"{cfg.algo} policy"}, "episodes": rows}


# --- the run ---------------------------------------------------------------------------------
def build_model(cfg: TrainSB3Config, envs, tb_dir: Path) -> BaseAlgorithm:
    kwargs = {**ALGORITHM_DEFAULTS[cfg.algo], **cfg.algo_kwargs}
    return ALGORITHMS[cfg.algo]("MlpPolicy", envs, seed=cfg.seed, device="cpu", verbose=0,
                                tensorboard_log=str(tb_dir), **kwargs)


def run(cfg: TrainSB3Config, out_dir: Path) -> dict[str, Any]:
    check_config(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.torch_threads)
    envs = training_envs(cfg)
    evaluation_env = real_env(cfg)
    t0 = time.perf_counter()
    try:
        model = build_model(cfg, envs, out_dir / "tb")
        desc = f"{cfg.algo} in {cfg.world}"
        with tqdm(total=cfg.total_timesteps, desc=desc, unit="step") as bar:
            evaluator = RealWorldEval(evaluation_env, eval_freq=cfg.eval_freq,
                                      episodes=cfg.eval_episodes, bar=bar)
            model.learn(cfg.total_timesteps, callback=evaluator,
                        tb_log_name=f"{cfg.algo}_{cfg.world}")
        train_seconds = time.perf_counter() - t0
        model.save(out_dir / "model.zip")
        audit_doc = audit_policy(model, cfg, cfg.audit_episodes)
    finally:
        envs.close()
        evaluation_env.close()
    write_atomic(out_dir / "audit.json", json.dumps(audit_doc, indent=1))
    summary: dict[str, Any] = {
        "algo": cfg.algo, "world": cfg.world, "reward": cfg.reward, "actions": cfg.actions,
        "total_timesteps": cfg.total_timesteps, "n_envs": cfg.n_envs, "vec_env": cfg.vec_env,
        "train_seconds": train_seconds, "steps_per_second": cfg.total_timesteps / train_seconds,
    }  # fmt: skip
    if evaluator.history:
        first, last = evaluator.history[0], evaluator.history[-1]
        summary.update({f"real_{k}": v for k, v in last.items() if k != "timesteps"})
        summary["real_final_coverage_before_training"] = first["final_coverage"]
    if audit_doc["episodes"]:
        report = audit_report(audit_doc, margin=cfg.audit_margin)
        summary.update({"audit_mean_gap": report["mean_gap"], "audit_flagged": report["flagged"],
                        "audit_episodes": len(report["episodes"])})
        _log_audit(model, report)
        print(format_audit(report))
    doc = {"summary": summary, "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
           "evaluations": evaluator.history}  # fmt: skip
    write_atomic(out_dir / "results.json", json.dumps(doc, indent=1))
    return doc


def _log_audit(model: BaseAlgorithm, report: dict[str, Any]) -> None:
    """The audit's figures as scalars at the final step of the policy's TensorBoard run."""
    real = [r["real_return"] for r in report["episodes"]]
    predicted = [r["predicted_return"] for r in report["episodes"]]
    model.logger.record("audit/real_return", float(np.mean(real)))
    model.logger.record("audit/predicted_return", float(np.mean(predicted)))
    model.logger.record("audit/return_gap", float(report["mean_gap"]))
    model.logger.record("audit/flagged", int(report["flagged"]))
    model.logger.dump(model.num_timesteps)


@hydra.main(version_base=None, config_path="../configs", config_name="train_sb3")
def main(cfg) -> None:
    train_cfg = OmegaConf.to_object(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    doc = run(train_cfg, out_dir)
    print(json.dumps(doc["summary"], indent=1))
    print(f"results: {out_dir / 'results.json'}   TensorBoard: tensorboard --logdir {out_dir / 'tb'}")


if __name__ == "__main__":
    main()
