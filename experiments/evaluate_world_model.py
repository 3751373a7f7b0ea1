"""How faithful is ``mini-dreamzero``? Fidelity of the world model on held-out episodes.

For each evaluated episode of ``test_data`` (from ``experiments.collect``):

* **VAE**: reconstruction PSNR over every frame.
* **Open-loop prediction**: at a few start points per episode, ``context`` real frames are
  teacher-forced into the model (``start_from_frame``, then ``step`` + ``resync`` with the
  real frame and the real pusher position, as ``training.imagine`` does); then the model
  rolls out ``max(horizons)`` frames under the recorded actions. The k-th imagined frame
  is scored against the real frame k steps after the last context frame, next to the
  *copy-last* baseline (the last real context frame, and its real poses):

  - ``psnr``: PSNR of the decoded frame (dB, higher is better);
  - ``changed_mse``: MSE over the pixels that really changed (value differs by more than
    0.05 in any channel between the last context frame and the target), all channels;
  - ``block_pos_err_px`` / ``block_angle_err_rad``: the predicted task state's T pose vs
    the real one (angle wrapped to [0, pi]);
  - ``agent_pos_err_px``: the predicted pusher position vs the real one;
  - ``coverage_abs_err``: the coverage of the predicted pose (the reward) vs the true one;
  - ``frame_state_iou``: does the decoded frame show the T where the predicted state says?
    The T found in the decoded frame by its colour, IoU with the T drawn at the predicted
    pose. Its copy-last column is the metric's ceiling: the same test on the *real*
    target frame against the real pose (the colour test and the 64 px grid lose a little).

* **Coverage head** (a diagnostic; the reward reads the state) on the frames written from
  real frames: coverage mean absolute error, and success AUC (rank-based; ``n/a`` with
  one class).

Outputs in ``out_dir`` (default: the Hydra run directory): ``metrics.json``,
``metrics.md`` (the table), ``strip.png`` (real vs imagined, two episodes),
``fidelity.png`` (metrics vs horizon) and a TensorBoard run under ``tb/``.

    python -m experiments.evaluate_world_model weights_dir=runs/weights episodes=50
    python -m experiments.evaluate_world_model episodes=5 'horizons=[1,4,8]' out_dir=/tmp/eval
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from arcfab_gym.atomic import write_atomic
from arcfab_gym.models.mini_dreamzero.backend import MiniDreamZero, Weights
from arcfab_gym.models.mini_dreamzero.vae import frames_to_tensor, psnr
from arcfab_gym.tasks import pusht
from arcfab_gym.tasks.pusht import wrap_angle


@dataclass
class EvalConfig:
    """Arguments of world-model evaluation."""

    weights_dir: str | None = None
    """Folder with config.json + safetensors (None: the weights shipped in the package)."""
    test_data: str = "data/pusht_test.npz"
    """Held-out episodes from experiments.collect."""
    episodes: int = 50
    """Episodes evaluated (the first ones of test_data)."""
    context: int = 4
    """Real frames teacher-forced before each open-loop rollout."""
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Prediction horizons k (frames after the last context frame) to score."""
    starts_per_episode: int = 4
    """Rollout start points per episode, evenly spread over the episode."""
    cfg_scale: Optional[float] = None
    """Classifier-free guidance scale of the model (None: what the weights recommend)."""
    num_denoise_steps: Optional[int] = None
    """Flow-matching Euler steps per generated frame (None: the weights' recommendation)."""
    warm_start: Optional[float] = None
    """Start the flow at this t from "no change", noised (0: from pure noise; None: the
    weights' recommendation)."""
    seed: int = 0
    """Base seed of the model's sampling noise (rollout i uses seed + i)."""
    threads: int = 2
    """torch CPU threads."""
    out_dir: str | None = None
    """Where the outputs go (None: the Hydra run directory)."""


ConfigStore.instance().store(name="evaluate_world_model_schema", node=EvalConfig)

#: Frames shown per row of ``strip.png`` (after the context).
STRIP_FRAMES = 16
#: Episodes shown in ``strip.png``.
STRIP_EPISODES = 2
#: A pixel counts as changed if a channel moves by more than this (values in [0, 1]).
CHANGE_THRESHOLD = 0.05
#: Metrics per horizon, in table order: key, label, higher is better.
HORIZON_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("psnr", "PSNR (dB)", True),
    ("changed_mse", "MSE on changed pixels", False),
    ("psnr_anchored", "PSNR, anchored decode (dB)", True),
    ("changed_mse_anchored", "MSE on changed pixels, anchored", False),
    ("block_pos_err_px", "block position error (px)", False),
    ("block_angle_err_rad", "block angle error (rad)", False),
    ("agent_pos_err_px", "agent position error (px)", False),
    ("coverage_abs_err", "coverage abs. error", False),
    ("frame_state_iou", "T in decoded frame vs state, IoU", True),
)
#: The T's colour in gym-pusht's frames (LightSlateGray) and the per-channel tolerance of
#: the colour test that finds it in a (decoded) frame.
T_COLOUR = np.array([119, 136, 153])
T_COLOUR_TOLERANCE = 45
SOURCES = ("model", "copy_last")


# --- small metrics -----------------------------------------------------------------------------
def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by ranks (Mann-Whitney U, ties get average ranks); None with one class."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank (1-based) over each run of tied scores.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def changed_mask(last: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose value changes by > CHANGE_THRESHOLD in any channel.
    ``last``, ``target``: float [H, W, 3] in [0, 1]."""
    return (np.abs(target - last) > CHANGE_THRESHOLD).any(axis=-1)


def masked_mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """MSE over the masked pixels (all channels); NaN if the mask is empty."""
    if not mask.any():
        return float("nan")
    return float(((pred - target) ** 2)[mask].mean())


def t_mask_from_frame(frame: np.ndarray) -> np.ndarray:
    """[H, W] bool: the pixels of a uint8 frame that have the T's colour."""
    diff = np.abs(frame.astype(np.int16) - T_COLOUR).max(axis=-1)
    return diff <= T_COLOUR_TOLERANCE


def t_mask_at_pose(block_pose: np.ndarray, size: int) -> np.ndarray:
    """[size, size] bool: the T drawn at ``block_pose`` (at least half of a pixel)."""
    from arcfab_gym.models.mini_dreamzero import features

    state = features.state_from_poses(np.zeros(2), np.asarray(block_pose, dtype=np.float64))
    return features.state_map(torch.from_numpy(state)[None], size)[0, 0].numpy() >= 0.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def anchored_frame(real_last: np.ndarray, decoded_last: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """The last real frame plus the change the model imagined since it: ``real_last +
    decode(z_k) - decode(z_last)`` -- the autoencoder's own reconstruction error on the
    static scene cancels (uint8 in, uint8 out)."""
    x = real_last.astype(np.int16) + decoded.astype(np.int16) - decoded_last.astype(np.int16)
    return np.clip(x, 0, 255).astype(np.uint8)


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 frames [H, W, 3]."""
    return float(psnr(frames_to_tensor(a)[None], frames_to_tensor(b)[None])[0])


def spearman(a, b) -> float | None:
    """Spearman's rank correlation of two samples (None when either is constant)."""
    ra = np.argsort(np.argsort(np.asarray(a, float))).astype(float)
    rb = np.argsort(np.argsort(np.asarray(b, float))).astype(float)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def disagreement_calibration(doubt: list[float], error: list[float]) -> dict:
    """Does the state ensemble know when it is wrong? Its disagreement summed over a
    rollout's frames against the block's position error at the rollout's end: the mean
    of each, their rank correlation, and the error of the least and most doubted fifth."""
    d, e = np.asarray(doubt, float), np.asarray(error, float)
    out = {"mean_disagreement_px": float(d.mean()) if len(d) else None,
           "spearman_vs_block_err": spearman(d, e)}
    if len(d) >= 10 and np.ptp(d) > 0:
        lo, hi = np.quantile(d, [0.2, 0.8])
        out["block_err_px_least_doubted_fifth"] = float(e[d <= lo].mean())
        out["block_err_px_most_doubted_fifth"] = float(e[d >= hi].mean())
    return out


def _f(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / 255.0


def _nanmean(values: list[float]) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


# --- the evaluation ------------------------------------------------------------------------------
def start_points(n_frames: int, context: int, horizon: int, n: int) -> list[int]:
    """Evenly spread first-context-frame indices s with s + context - 1 + horizon < n_frames."""
    last = n_frames - context - horizon
    if last < 0:
        raise ValueError(
            f"episodes have {n_frames} frames: too few for context={context} + horizon={horizon}"
        )
    return sorted({int(round(x)) for x in np.linspace(0, last, max(1, n))})


@torch.no_grad()
def rollout(model: MiniDreamZero, ep: dict[str, np.ndarray], prompt: str, s: int, context: int,
            horizon: int, seed: int) -> tuple[np.ndarray, list[dict], list[np.ndarray]]:
    """Teacher-force frames s .. s+context-1, then imagine ``horizon`` frames.

    Returns the records [context, 9] of the real (teacher-forced) frames (see
    ``backend.FRAME_INFO_COLUMNS``), the info dicts of the imagined frames, and the
    imagined frames decoded (uint8)."""
    frames, agent, block, actions = ep["frames"], ep["agent_pos"], ep["block_pose"], ep["actions"]
    model.start_from_frame(frames[s], agent[s], block[s], prompt=prompt, seed=seed)
    for t in range(s + 1, s + context):
        model.step(actions[t - 1])
        model.resync(frames[t], agent[t], block[t])
    real_records = model.extract_state().tensors["frame_info"].numpy()[-context:].copy()
    anchor = model.decode_frame(model.frame_count - 1)
    infos, imagined = [], []
    for t in range(s + context, s + context + horizon):
        out = model.step(actions[t - 1])
        infos.append(out.info)
        imagined.append(model.decode_frame(model.frame_count - 1))
    return real_records, infos, imagined, anchor


@torch.no_grad()
def vae_psnr(vae, frames: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per-frame reconstruction PSNR of uint8 frames [N, S, S, 3]."""
    out = []
    for i in range(0, len(frames), chunk):
        x = frames_to_tensor(frames[i : i + chunk])
        out.append(psnr(vae.decode(vae.encode(x)), x))
    return torch.cat(out).numpy().astype(np.float64)


def _to_config(cfg: Any) -> EvalConfig:
    if isinstance(cfg, EvalConfig):
        return cfg
    if not isinstance(cfg, dict):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    names = {f.name for f in fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in cfg.items() if k in names})


def _default_out_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        return Path("runs/evaluate_world_model") / time.strftime("%Y%m%d-%H%M%S")


def evaluate(cfg: EvalConfig | dict | Any) -> dict:
    """Run the evaluation, write the outputs, return the metrics (as in ``metrics.json``)."""
    cfg = _to_config(cfg)
    horizons = sorted({int(k) for k in cfg.horizons})
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be positive integers, got {cfg.horizons}")
    if cfg.context < 1:
        raise ValueError(f"context must be >= 1, got {cfg.context}")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _evaluate(cfg, horizons, out_dir)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: EvalConfig, horizons: list[int], out_dir: Path) -> dict:
    t0 = time.perf_counter()

    with np.load(cfg.test_data) as f:
        data = {k: f[k] for k in f.files}
    E = min(int(cfg.episodes), len(data["frames"]))
    if E < 1:
        raise ValueError(f"no episodes to evaluate (episodes={cfg.episodes})")
    T = data["frames"].shape[1]
    H = horizons[-1]
    strip_h = min(max(H, STRIP_FRAMES), T - cfg.context)
    starts = start_points(T, cfg.context, H, cfg.starts_per_episode)

    weights = Weights.load(cfg.weights_dir)
    model = MiniDreamZero(weights_dir=cfg.weights_dir, cfg_scale=cfg.cfg_scale,
                          num_denoise_steps=cfg.num_denoise_steps, warm_start=cfg.warm_start,
                          _weights=weights)
    if model.frame_size != data["frames"].shape[2]:
        raise ValueError(f"model frames are {model.frame_size}px, data frames "
                         f"{data['frames'].shape[2]}px")

    per_k = {k: {m: {s: [] for s in SOURCES} for m, _, _ in HORIZON_METRICS} for k in horizons}
    cov_pred, cov_true, succ_prob, succ_true = [], [], [], []
    # The ensemble's summed disagreement up to frame k beside the block error at k.
    doubt = {k: ([], []) for k in horizons}
    strips: list[tuple[int, np.ndarray, np.ndarray]] = []
    n_rollouts = 0
    with tqdm(total=E * len(starts), desc="evaluate world model", unit="rollout") as bar:
        for e in range(E):
            ep = {k: data[k][e] for k in ("frames", "agent_pos", "block_pose", "actions",
                                          "coverage", "success")}
            prompt = pusht.PROMPTS[int(data["prompt_id"][e])]
            for j, s in enumerate(starts):
                want_strip = j == 0 and e < STRIP_EPISODES
                length = strip_h if want_strip else H  # strip_h >= H
                records, infos, imagined, anchor = rollout(
                    model, ep, prompt, s, cfg.context, length, cfg.seed + n_rollouts
                )
                n_rollouts += 1
                # The reward head on frames written from real frames.
                ctx = slice(s, s + cfg.context)
                cov_pred.extend(np.clip(records[:, 8], 0.0, 1.0).tolist())
                cov_true.extend(ep["coverage"][ctx].tolist())
                succ_prob.extend(records[:, 8].tolist())
                succ_true.extend(ep["success"][ctx].tolist())
                last = s + cfg.context - 1
                last_frame = _f(ep["frames"][last])
                for k in horizons:
                    tgt = last + k
                    info, pred = infos[k - 1], imagined[k - 1]
                    real = ep["frames"][tgt]
                    mask = changed_mask(last_frame, _f(real))
                    pose, base_pose = ep["block_pose"][tgt], ep["block_pose"][last]
                    m = per_k[k]
                    m["psnr"]["model"].append(frame_psnr(pred, real))
                    m["psnr"]["copy_last"].append(frame_psnr(ep["frames"][last], real))
                    m["changed_mse"]["model"].append(masked_mse(_f(pred), _f(real), mask))
                    m["changed_mse"]["copy_last"].append(masked_mse(last_frame, _f(real), mask))
                    anchored = anchored_frame(ep["frames"][last], anchor, pred)
                    m["psnr_anchored"]["model"].append(frame_psnr(anchored, real))
                    m["psnr_anchored"]["copy_last"].append(m["psnr"]["copy_last"][-1])
                    m["changed_mse_anchored"]["model"].append(masked_mse(_f(anchored), _f(real), mask))
                    m["changed_mse_anchored"]["copy_last"].append(m["changed_mse"]["copy_last"][-1])
                    bp = np.asarray(info["block_pose"], dtype=np.float64)
                    m["block_pos_err_px"]["model"].append(float(np.linalg.norm(bp[:2] - pose[:2])))
                    doubt[k][0].append(sum(float(i.get("disagreement", 0.0)) for i in infos[:k]))
                    doubt[k][1].append(m["block_pos_err_px"]["model"][-1])
                    m["block_pos_err_px"]["copy_last"].append(
                        float(np.linalg.norm(base_pose[:2] - pose[:2])))
                    m["block_angle_err_rad"]["model"].append(float(wrap_angle(bp[2] - pose[2])))
                    m["block_angle_err_rad"]["copy_last"].append(
                        float(wrap_angle(base_pose[2] - pose[2])))
                    ap = np.asarray(info["agent_pos"], dtype=np.float64)
                    m["agent_pos_err_px"]["model"].append(
                        float(np.linalg.norm(ap - ep["agent_pos"][tgt])))
                    m["agent_pos_err_px"]["copy_last"].append(
                        float(np.linalg.norm(ep["agent_pos"][last] - ep["agent_pos"][tgt])))
                    m["coverage_abs_err"]["model"].append(
                        abs(float(info["coverage"]) - float(ep["coverage"][tgt])))
                    m["coverage_abs_err"]["copy_last"].append(
                        abs(float(ep["coverage"][last]) - float(ep["coverage"][tgt])))
                    size = pred.shape[0]
                    m["frame_state_iou"]["model"].append(
                        mask_iou(t_mask_from_frame(pred), t_mask_at_pose(bp, size)))
                    m["frame_state_iou"]["copy_last"].append(
                        mask_iou(t_mask_from_frame(real), t_mask_at_pose(pose, size)))
                if want_strip:
                    n = min(STRIP_FRAMES, len(imagined))
                    strips.append((e, ep["frames"][last + 1 : last + 1 + n],
                                   np.stack(imagined[:n])))
                bar.update(1)

    eval_frames = data["frames"][:E].reshape(-1, *data["frames"].shape[2:])
    vae_p = vae_psnr(weights.vae, eval_frames)
    cov_pred_a, cov_true_a = np.asarray(cov_pred), np.asarray(cov_true)
    succ_true_a = np.asarray(succ_true, dtype=bool)
    auc = rank_auc(np.asarray(succ_prob), succ_true_a)
    metrics = {
        "weights": weights.source,
        "weights_id": weights.meta.get("weights_id", ""),
        "test_data": str(cfg.test_data),
        "config": asdict(cfg),
        "sampling": {k: getattr(model, k) for k in ("cfg_scale", "num_denoise_steps", "warm_start")},
        "n_episodes": E,
        "frames_per_episode": int(T),
        "start_points": starts,
        "n_rollouts": n_rollouts,
        "vae": {"psnr": float(vae_p.mean()), "psnr_min": float(vae_p.min()),
                "n_frames": int(len(vae_p))},
        "reward_head": {
            "coverage_mae": float(np.abs(cov_pred_a - cov_true_a).mean()),
            "coverage_mae_mean_baseline": float(np.abs(cov_true_a - cov_true_a.mean()).mean()),
            "success_auc": "n/a" if auc is None else auc,
            "n_frames": int(len(cov_true_a)),
            "n_success_frames": int(succ_true_a.sum()),
        },
        "horizons": {
            str(k): {
                m: {s: _nanmean(per_k[k][m][s]) for s in SOURCES}
                | {"n": int(np.isfinite(np.asarray(per_k[k][m]["model"], float)).sum())}
                for m, _, _ in HORIZON_METRICS
            }
            for k in horizons
        },
        "ensemble": {str(k): disagreement_calibration(*doubt[k]) for k in horizons},
        "seconds": None,
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 2)

    table = markdown_table(metrics, horizons)
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_atomic(out_dir / "metrics.md", table)
    strip_img = strip_picture(strips)
    imsave(out_dir / "strip.png", strip_img)
    fig = fidelity_figure(metrics, horizons)
    FigureCanvasAgg(fig)
    fig.savefig(out_dir / "fidelity.png", dpi=100)
    write_tensorboard(out_dir / "tb", metrics, horizons, table, strip_img, fig)
    model.close()
    return metrics


# --- reporting ------------------------------------------------------------------------------------
def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if key == "changed_mse":
        return f"{v:.4f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def markdown_table(metrics: dict, horizons: list[int]) -> str:
    """The metrics as markdown: one row per metric, model | copy-last per horizon."""
    head = "| metric | " + " | ".join(f"k={k} model | k={k} copy-last" for k in horizons) + " |"
    sep = "|---|" + "---:|---:|" * len(horizons)
    rows = [head, sep]
    for key, label, higher in HORIZON_METRICS:
        cells = []
        for k in horizons:
            m = metrics["horizons"][str(k)][key]
            cells += [_fmt(m["model"], key), _fmt(m["copy_last"], key)]
        rows.append(f"| {label} {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
    rh, vae = metrics["reward_head"], metrics["vae"]
    lines = [
        f"World-model fidelity: weights `{metrics['weights_id'] or metrics['weights']}`, "
        f"{metrics['n_episodes']} episodes, {metrics['n_rollouts']} rollouts "
        f"(context {metrics['config']['context']} real frames, copy-last = last context frame)",
        "",
        *rows,
        "",
        f"- VAE reconstruction PSNR: {_fmt(vae['psnr'])} dB over {vae['n_frames']} frames "
        f"(min {_fmt(vae['psnr_min'])})",
        f"- coverage head (diagnostic) MAE on real frames: {_fmt(rh['coverage_mae'])} "
        f"(predicting the mean: {_fmt(rh['coverage_mae_mean_baseline'])}; {rh['n_frames']} frames)",
        f"- success AUC on real frames: {_fmt(rh['success_auc'])} "
        f"({rh['n_success_frames']} success frames of {rh['n_frames']})",
    ]
    for k in horizons:
        ens = metrics.get("ensemble", {}).get(str(k))
        if ens and ens.get("mean_disagreement_px"):
            lines.append(
                f"- k={k}: state-ensemble disagreement summed over the rollout "
                f"{_fmt(ens['mean_disagreement_px'])} px; rank correlation with the block error "
                f"{_fmt(ens['spearman_vs_block_err'])}; block error of the least / most doubted "
                f"fifth {_fmt(ens.get('block_err_px_least_doubted_fifth'))} / "
                f"{_fmt(ens.get('block_err_px_most_doubted_fifth'))} px")
    return "\n".join(lines) + "\n"


def strip_picture(strips: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """uint8 picture: per episode a row of real frames over a row of imagined ones."""
    if not strips:
        return np.full((8, 8, 3), 255, np.uint8)
    rows = []
    gap = None
    for _, real, imagined in strips:
        S = real.shape[1]
        sep_v = np.full((S, 1, 3), 128, np.uint8)
        row_r = np.concatenate([x for f in real for x in (f, sep_v)][:-1], axis=1)
        row_i = np.concatenate([x for f in imagined for x in (f, sep_v)][:-1], axis=1)
        gap = np.full((4, row_r.shape[1], 3), 255, np.uint8)
        rows += [row_r, np.full((1, row_r.shape[1], 3), 128, np.uint8), row_i, gap]
    return np.concatenate(rows[:-1], axis=0)


def fidelity_figure(metrics: dict, horizons: list[int]) -> Figure:
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(3, 3).ravel()
    for ax, (key, label, higher) in zip(axes, HORIZON_METRICS):
        for src, style in (("model", "o-"), ("copy_last", "s--")):
            ys = [metrics["horizons"][str(k)][key][src] for k in horizons]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot(horizons, ys, style, label="model" if src == "model" else "copy last frame")
        ax.set_xscale("log", base=2)
        ax.set_xticks(horizons, [str(k) for k in horizons])
        ax.set_xlabel("horizon k (frames)")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"mini-dreamzero open-loop fidelity ({metrics['n_rollouts']} rollouts, "
                 f"VAE PSNR {metrics['vae']['psnr']:.1f} dB)")
    return fig


def _figure_rgb(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_tensorboard(tb_dir: Path, metrics: dict, horizons: list[int], table: str,
                      strip_img: np.ndarray, fig: Figure) -> None:
    writer = SummaryWriter(str(tb_dir))
    for k in horizons:
        for key, _, _ in HORIZON_METRICS:
            for src in SOURCES:
                v = metrics["horizons"][str(k)][key][src]
                if v is not None:
                    writer.add_scalar(f"{key}/{src}", v, k)
    writer.add_scalar("vae/psnr", metrics["vae"]["psnr"], 0)
    writer.add_scalar("reward_head/coverage_mae", metrics["reward_head"]["coverage_mae"], 0)
    auc = metrics["reward_head"]["success_auc"]
    if not isinstance(auc, str):
        writer.add_scalar("reward_head/success_auc", auc, 0)
    writer.add_image("rollouts/real_vs_imagined", strip_img, 0, dataformats="HWC")
    writer.add_image("fidelity/vs_horizon", _figure_rgb(fig), 0, dataformats="HWC")
    writer.add_text("metrics", table, 0)
    writer.close()


@hydra.main(version_base=None, config_path="../configs", config_name="evaluate_world_model")
def main(cfg) -> None:
    eval_cfg = _to_config(cfg)
    if eval_cfg.out_dir is None:
        eval_cfg.out_dir = HydraConfig.get().runtime.output_dir
    metrics = evaluate(eval_cfg)
    out = Path(eval_cfg.out_dir)
    print((out / "metrics.md").read_text())
    print(f"metrics:     {out / 'metrics.json'}")
    print(f"pictures:    {out / 'strip.png'}  {out / 'fidelity.png'}")
    print(f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    print(f"({metrics['seconds']} s)")


if __name__ == "__main__":
    main()
