"""``dreamzero``: DreamZero's own policy head (``WANPolicyHead.lazy_joint_video_action``)
behind the :class:`~arcfab_gym.models.base.WorldModel` contract, driven in-process.

One backend frame is one call of the head: one frame block (``num_frame_per_block`` latent
frames, 8 video frames at the DROID config) and one predicted action chunk. ``start`` makes
the first call on a real (or seed-drawn) frame; each ``step`` makes the next call, feeding
the model's own last predicted block back through DreamZero's imagination path
(``latent_video=``), with the agent's action chunk as the proprioceptive state input.

Working state, all of it in the snapshot (see :meth:`DreamZero.extract_state`):

* ``kv_cache1`` / ``kv_cache_neg``: per layer ``[2, B, L, heads, head_dim]`` (bf16), kept here
  as one tensor per frame block ``[layers, 2, B, block_tokens, heads, head_dim]`` that is
  never written again, so a checkpoint shares every earlier block with its parent and
  costs O(new frames); the head gets ``torch.cat`` of them when this backend swaps in.
  With ``kv_storage="recompute"`` the snapshot holds no cache bytes: only the latents and
  text each block was written from, and a restore re-runs DreamZero's cache-writing pass;
* ``clip_feas`` and ``ys`` (set at the window's first frame), ``language`` (the reset key),
  ``current_start_frame``, ``seed`` (noise is drawn from a generator seeded with it on every
  call: there is no RNG stream to save);
* the latent video (one block per frame), the predicted action chunk of every frame, and
  the agent's actions;
* ``crossattn_cache`` / ``crossattn_cache_neg``: allocated by the head but never read or
  written by its forward pass -- their shapes go in ``meta``, no bytes (zeros are
  re-allocated on restore so the head's asserts hold).

DreamZero's reset rules (no language, language changed, a 1-frame input,
``current_start_frame >= local_attn_size``) are honoured as follows: a restore installs the
saved language key and counters, so it never trips one; ``set_prompt`` moves the key with
the text, so a new prompt continues the history; steps feed ``4`` frames. Only the window
end resets, as DreamZero does on a robot: the context restarts from the last frame
(``info["reset"]`` says when).

With two ranks (:meth:`DreamZero.parallelize`) each process keeps its own CFG branch's
cache; :mod:`arcfab_gym.models.dreamzero.ranks` gathers, restores and seeds both together.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arcfab_gym.errors import ArcFabricError, HistoryError, StateMismatchError
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel, as_observation
from arcfab_gym.models.dreamzero import runtime

#: Prompts understood by default (DROID-style instructions); any list can be passed.
DEFAULT_PROMPTS = (
    "pick up the cup and put it in the bowl",
    "open the top drawer",
    "wipe the table with the towel",
)
STATE_VERSION = 1
#: Backend names of the two CFG branches' caches -> the head's attributes.
_BRANCH_ATTR = {"kv1": "kv_cache1", "kvn": "kv_cache_neg"}
_RESET_RE = re.compile(r"^(.*), reset current_start_frame to 0$", re.MULTILINE)


class PromptTooLongError(ArcFabricError, ValueError):
    """A prompt with more tokens than the model's ``text_len``."""


class WindowError(HistoryError):
    """A rewind past the start of DreamZero's attention window."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 -> its int16 bit pattern on the CPU (exact; numpy- and safetensors-friendly)."""
    t = t.detach().to("cpu")
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _unbits(t: torch.Tensor, device: str) -> torch.Tensor:
    return (t.view(torch.bfloat16) if t.dtype == torch.int16 else t).to(device)


class WordTokenizer:
    """The tiny model's tokenizer: one id per word (CRC-32 into ``1..vocab-1``; 0 pads)."""

    def __init__(self, vocab: int):
        self.vocab = int(vocab)

    def __call__(self, text: str) -> list[int]:
        return [zlib.crc32(word.encode("utf-8")) % (self.vocab - 1) + 1 for word in text.split()]


class HFTokenizer:
    """DreamZero's T5 tokenizer (umt5-xxl) from a local folder, with its end token."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)

    def __call__(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])


def tiny_checkpoint_dir(seed: int = 0, src: str | None = None) -> Path:
    """A tiny random DreamZero checkpoint (made once per seed and machine, in the temp dir)."""
    from arcfab_gym.models.dreamzero import tiny

    # Keyed by everything the files depend on: the tiny config, the seed, the stand-ins'
    # code and DreamZero's commit (a change to any of them makes a new folder).
    commit = runtime.find_src(src) / "UPSTREAM_COMMIT"
    parts = [json.dumps([tiny.TINY, int(seed)], sort_keys=True),
             Path(tiny.__file__).read_text(), commit.read_text() if commit.exists() else ""]  # fmt: skip
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    out = Path(tempfile.gettempdir()) / f"arcfab-dreamzero-tiny-{key[:12]}"
    if not (out / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        tiny.write_tiny_checkpoint(tmp, seed=seed, src=src)
        # The config names the encoders' .pth files by path: rewrite them for the final place.
        cfg = (tmp / "config.json").read_text().replace(str(tmp), str(out))
        (tmp / "config.json").write_text(cfg)
        try:
            os.rename(tmp, out)
        except OSError:  # made meanwhile by another process
            pass
    return out


class DreamZero(WorldModel):
    """DreamZero (``WANPolicyHead`` + ``CausalWanModel``) as a world model.

    Args:
        checkpoint: a DreamZero checkpoint folder (``config.json`` + ``model.safetensors``
            or its shards, as DreamZero's loader reads it; the frozen encoders' ``.pth``
            paths in its config). None builds the tiny random model (tests, CPU).
        tiny_seed: the random weights of the tiny model.
        device: ``"cpu"`` (DreamZero's CUDA-only spots are passed, see ``runtime``) or a
            CUDA device.
        tokenizer: folder of DreamZero's T5 tokenizer (umt5-xxl); None: one id per word (tiny model).
        prompts: the closed prompt vocabulary.
        embodiment_id: passed to the head (this DreamZero commit's DiT uses embodiment 0
            whatever it is given).
        num_inference_steps / cfg_scale: the head's sampling settings (None: DreamZero's,
            16 steps and 5.0).
        src: DreamZero's source folder (else ``ARCFAB_DREAMZERO_SRC`` or the vendored copy).
        kv_storage: ``"blocks"`` -- a snapshot holds the KV cache, one shared tensor per frame
            block (a checkpoint costs one block: 2.9 GB at 14B); ``"recompute"`` -- it holds
            only the latents the blocks were written from and the text of each write, and a
            restore re-runs DreamZero's own cache-writing passes (``_run_diffusion_steps``
            with ``update_kv_cache=True``), bit for bit (a checkpoint costs one latent
            block: 0.23 MB at 14B; a restore up to one pass per block in the window).
        image_size: ``(H, W)`` of the head's input video (None: 352 x 640 for 880 tokens per
            latent frame, DROID's three views tiled; else the square that fits).

    Action: the agent's action chunk ``[action_horizon * action_dim]`` in ``[-1, 1]``
    (row-major ``[horizon, dim]``); its last row is the proprioceptive state the next block
    is conditioned on (DreamZero takes no action input: it predicts the chunk).
    Observation: ``action_chunk`` (the chunk DreamZero predicts for the current frame,
    ``[horizon, dim]`` float32) and ``frame`` (the current decoded frame, uint8).
    Reward 0 and never terminated: DreamZero has no task head.
    """

    name = "dreamzero"
    prompts = DEFAULT_PROMPTS
    observation_keys = ("action_chunk",)

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        tiny_seed: int = 0,
        device: str = "cpu",
        tokenizer: str | None = None,
        prompts: tuple[str, ...] | list[str] | None = None,
        negative_prompt: str = "",
        embodiment_id: int = 0,
        num_inference_steps: int | None = None,
        cfg_scale: float | None = None,
        src: str | None = None,
        image_size: tuple[int, int] | list[int] | None = None,
        kv_storage: str = "blocks",
        _head: torch.nn.Module | None = None,
    ):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.tiny_seed = int(tiny_seed)
        self.device = str(device)
        self.src = None if src is None else str(src)
        if kv_storage not in ("blocks", "recompute"):
            raise ValueError(f"kv_storage must be 'blocks' or 'recompute', got {kv_storage!r}")
        self.kv_storage = kv_storage
        self.tokenizer_path = tokenizer
        if _head is None:
            ckpt = self.checkpoint or tiny_checkpoint_dir(self.tiny_seed, self.src)
            _head = runtime.load_head_from_checkpoint(ckpt, device=self.device, src=self.src)
        else:
            runtime.import_dreamzero(self.src)
        self.head = _head
        self._call_ctx = runtime.cpu_call if self.device == "cpu" else runtime.gpu_call
        vocab = self.head.text_encoder.token_embedding.num_embeddings
        self.tok = HFTokenizer(tokenizer) if tokenizer else WordTokenizer(vocab)
        if prompts is not None:
            self.prompts = tuple(prompts)
        if not self.prompts:
            raise ValueError("prompts must name at least one prompt")
        self.negative_prompt = str(negative_prompt)
        self.embodiment_id = int(embodiment_id)
        if num_inference_steps is not None:
            if not 1 <= int(num_inference_steps) <= len(self.head.dit_step_mask):
                raise ValueError(
                    f"num_inference_steps must be in 1..{len(self.head.dit_step_mask)}"
                )
            self.head.num_inference_steps = int(num_inference_steps)
        if cfg_scale is not None:
            self.head.cfg_scale = float(cfg_scale)
        self.num_inference_steps = int(self.head.num_inference_steps)
        self.cfg_scale = float(self.head.cfg_scale)
        m = self.head.model
        self.text_len = int(m.text_len)
        self.num_layers, self.num_heads = int(m.num_layers), int(m.num_heads)
        self.head_dim = int(m.dim) // int(m.num_heads)
        self.frame_seqlen = int(m.frame_seqlen)
        self.nfpb = int(self.head.num_frame_per_block)
        self.local_attn_size = int(m.local_attn_size)
        self.action_horizon = int(self.head.action_horizon)
        self.model_action_dim = int(m.action_dim)
        self.max_state_dim = int(m.max_state_dim)
        self.action_dim = self.action_horizon * self.model_action_dim  # instance override
        if image_size is None:
            # DROID: 3 views tiled into 352 x 640 (44 x 80 latent, 880 tokens); else square.
            side = int(round(np.sqrt(self.frame_seqlen))) * 16
            image_size = (352, 640) if self.frame_seqlen == 880 else (side, side)
        self.frame_hw = (int(image_size[0]), int(image_size[1]))
        if (self.frame_hw[0] // 16) * (self.frame_hw[1] // 16) != self.frame_seqlen:
            raise ValueError(
                f"image_size {self.frame_hw} does not give frame_seqlen={self.frame_seqlen} tokens"
            )
        self.frame_size = self.frame_hw[0]
        #: This process's share of the CFG branches: both, or one per rank with two ranks
        #: (DreamZero's ip split: rank 0 kv_cache1, rank 1 kv_cache_neg).
        self.rank, self.ranks = 0, 1
        self._own: tuple[str, ...] = ("kv1", "kvn")
        self._w: dict[str, Any] | None = None
        self._installed: int | None = None  # version of the world now in the head
        self._version = 0
        self.last_log = ""

    # --- text ---------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask ``[1, text_len]``; a clear error where the prompt does not fit."""
        ids = self.tok(prompt)
        if len(ids) > self.text_len:
            raise PromptTooLongError(
                f"prompt {prompt!r} has {len(ids)} tokens; this DreamZero takes at most "
                f"text_len={self.text_len} (a longer one would be cut silently)"
            )
        out = torch.zeros(1, self.text_len, dtype=torch.long)
        out[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out, (out > 0).long() if ids else torch.zeros_like(out)

    def _check_prompt(self, prompt: str) -> torch.Tensor:
        self.check_prompt(prompt)
        return self.tokenize(prompt)[0]

    # --- life cycle --------------------------------------------------------------------------
    def start(self, prompt, seed, initial_state=None):
        language = self._check_prompt(prompt)
        if initial_state is None:
            frame = self._seed_frame(int(seed))
        else:
            frame = np.asarray(initial_state)
            if frame.shape != (*self.frame_hw, 3) or frame.dtype != np.uint8:
                raise ValueError(
                    f"initial_state must be a uint8 frame {(*self.frame_hw, 3)}, got "
                    f"{frame.dtype} {frame.shape}"
                )
        w = {"prompt": prompt, "seed": int(seed), "language": language, "kv1": [], "kvn": [],
             "latents": [], "chunks": [], "actions": [], "window_start": 0,
             "kv_lang": [], "kv_from": [],
             "csf": 0, "clip_feas": None, "ys": None, "pending_frames": None}  # fmt: skip
        self._w = w
        self._version += 1
        self._installed = None
        self.head.language = None  # a new history: DreamZero's own reset ("no language")
        self.head.current_start_frame = 0
        state = torch.zeros(self.action_dim, dtype=torch.float32)
        info = self._call(w, images=torch.from_numpy(frame.copy())[None, None], state=state)
        return self.observe(), info

    def _seed_frame(self, seed: int) -> np.ndarray:
        """A smooth random picture drawn from ``seed`` (no task: a stand-in first frame)."""
        g = np.random.default_rng(seed)
        low = g.uniform(0, 255, size=(4, 4, 3))
        h, w = self.frame_hw
        img = np.kron(low, np.ones((h // 4, w // 4, 1)))
        return np.clip(img + g.normal(0, 8, size=img.shape), 0, 255).astype(np.uint8)

    def step(self, action) -> StepOutput:
        self._require_started()
        a = self.check_action(action)
        w = self._w
        info = self._call(w, images=self._next_images(w), state=torch.from_numpy(a.astype(np.float32)),
                          latent_video=None if w["pending_frames"] is not None else w["latents"][-1])  # fmt: skip
        return StepOutput(observation=self.observe(), reward=0.0, terminated=False, info=info)

    def _next_images(self, w) -> torch.Tensor:
        """The 4 frames the next call is given: a real observation (after ``resync``), else
        the model's own last block decoded, which DreamZero re-encodes as the new first
        frame when its window is full (and ignores otherwise: ``latent_video`` is used)."""
        if w["pending_frames"] is not None:
            return w["pending_frames"]
        if w["csf"] < self.local_attn_size:
            h, wd = self.frame_hw
            return torch.zeros(1, 4, h, wd, 3, dtype=torch.uint8)  # shape only: not read
        video = self._decode(w["latents"][-1])  # [T, H, W, 3]
        return torch.from_numpy(video[-4:])[None]

    # --- the call -----------------------------------------------------------------------------
    def _install(self, w) -> None:
        """Make ``w`` the head's state (skipped when it already is)."""
        if self._installed == self._version and getattr(self.head, "_arcfab_owner", None) is self:
            return
        h, dev = self.head, self.device
        if w["latents"] and any(b is None for b in w[self._own[0]]):
            self._rebuild_kv(w)
        elif w["latents"]:
            for branch, attr in _BRANCH_ATTR.items():
                if branch in self._own:
                    cache = [torch.cat([_unbits(b[i], dev) for b in w[branch]], dim=2)
                             for i in range(self.num_layers)]  # fmt: skip
                else:  # the other rank's branch: as the head creates it, empty
                    cache = [torch.zeros(2, 1, 0, self.num_heads, self.head_dim,
                                         dtype=torch.bfloat16, device=dev)
                             for _ in range(self.num_layers)]  # fmt: skip
                setattr(h, attr, cache)
            h.crossattn_cache, h.crossattn_cache_neg = self._dead_crossattn()
            h.clip_feas = _unbits(w["clip_feas"], dev)
            h.ys = _unbits(w["ys"], dev)
            h.language = w["language"].to(dev)
        h.current_start_frame = w["csf"]
        h.seed = w["seed"]
        h._arcfab_owner = self
        self._installed = self._version

    @torch.no_grad()
    def _rebuild_kv(self, w) -> None:
        """Install ``w`` re-making the cache blocks it left out, by DreamZero's own
        cache-writing pass, block by block in the order the calls wrote them (same
        latents, text, ``ys`` slice, positions): the same bits."""
        from transformers.feature_extraction_utils import BatchFeature

        h, dev, nfpb, ws = self.head, self.device, self.nfpb, w["window_start"]
        h.kv_cache1, h.kv_cache_neg = h._create_kv_caches(1, torch.bfloat16, dev, self.frame_seqlen)
        h.crossattn_cache, h.crossattn_cache_neg = self._dead_crossattn()
        h.clip_feas, h.ys = _unbits(w["clip_feas"], dev), _unbits(w["ys"], dev)
        neg, neg_mask = self.tokenize(self.negative_prompt)
        with self._call_ctx():
            for j in range(len(w[self._own[0]])):
                stored = [w[b][j] for b in self._own]
                if all(x is not None for x in stored):
                    for b, x in zip(self._own, stored):
                        attr = _BRANCH_ATTR[b]
                        setattr(h, attr, [torch.cat([c, _unbits(x[i], dev)], dim=2)
                                          for i, c in enumerate(getattr(h, attr))])  # fmt: skip
                    continue
                lang = w["kv_lang"][j].to(dev)
                data = BatchFeature(data={
                    "text": lang, "text_attention_mask": (lang > 0).long(),
                    "text_negative": neg.to(dev), "text_attention_mask_negative": neg_mask.to(dev)})  # fmt: skip
                embs = [h.encode_prompt(x, m) for x, m in h._prepare_text_inputs(data)]
                if j == 0:  # the window's first frame
                    src, t_len, c = w["latents"][ws][:, :1], 1, 0
                    y, seq = h.ys[:, :, 0:1], self.frame_seqlen
                else:  # block j was written from the previous frame's block
                    src, t_len, c = w["latents"][ws + j - 1][:, -nfpb:], nfpb, 1 + nfpb * j
                    y = h.ys[:, :, c - nfpb : c] if c <= h.ys.shape[2] else h.ys[:, :, -nfpb:]
                    seq = nfpb * self.frame_seqlen
                h._run_diffusion_steps(
                    noisy_input=_unbits(src, dev)[None].to(torch.bfloat16),
                    timestep=torch.zeros([1, t_len], dtype=torch.int64, device=dev),
                    action=None, timestep_action=None, state=None, embodiment_id=None,
                    context=embs, seq_len=seq, y=y, clip_feature=h.clip_feas,
                    kv_caches=h._get_caches([h.kv_cache1, h.kv_cache_neg]),
                    crossattn_caches=h._get_caches([h.crossattn_cache, h.crossattn_cache_neg]),
                    kv_cache_metadata={"start_frame": max(c - nfpb, 0), "update_kv_cache": True},
                )  # fmt: skip
        # Keep the rebuilt blocks in the live world (stepping on needs no second rebuild).
        for b in self._own:
            cache, start, blocks = getattr(h, _BRANCH_ATTR[b]), 0, []
            for j in range(len(w[b])):
                n = self.frame_seqlen if j == 0 else nfpb * self.frame_seqlen
                blocks.append(
                    torch.stack([_bits(x[:, :, start : start + n]) for x in cache]).clone()
                )
                start += n
            w[b] = blocks
        h.language = w["language"].to(dev)

    def _dead_crossattn(self):
        """Zeros of the shape the head allocates (it never reads or writes them)."""
        shape = tuple(self._crossattn_shape())
        cached = getattr(self.head, "_arcfab_crossattn", None)
        if cached is None or tuple(cached[0][0].shape) != shape[1:]:
            z = lambda: [torch.zeros(shape[1:], dtype=torch.bfloat16, device=self.device)
                         for _ in range(shape[0])]  # fmt: skip
            cached = (z(), z())
            self.head._arcfab_crossattn = cached
        return cached

    def _crossattn_shape(self) -> list[int]:
        return [self.num_layers, 2, 1, 512, self.num_heads, self.head_dim]

    @torch.no_grad()
    def _call(self, w, *, images, state, latent_video=None) -> dict[str, Any]:
        self._install(w)
        h = self.head
        text, mask = w["language"], (w["language"] > 0).long()
        neg, neg_mask = self.tokenize(self.negative_prompt)
        st = torch.zeros(1, 1, self.max_state_dim, dtype=torch.float32)
        st[0, 0, : self.model_action_dim] = state.reshape(
            self.action_horizon, self.model_action_dim
        )[-1]
        from transformers.feature_extraction_utils import BatchFeature

        dev = self.device
        data = BatchFeature(data={
            "images": images.to(dev), "text": text.to(dev), "text_attention_mask": mask.to(dev),
            "text_negative": neg.to(dev), "text_attention_mask_negative": neg_mask.to(dev),
            "state": st.to(dev), "embodiment_id": torch.tensor([self.embodiment_id], device=dev),
        })  # fmt: skip
        lv = None if latent_video is None else _unbits(latent_video, dev)[None]
        kv_from = "frames" if latent_video is None else "latent"
        log = io.StringIO()
        mine = _BRANCH_ATTR[self._own[0]]
        kv_before = 0 if getattr(h, mine) is None else int(getattr(h, mine)[0].shape[2])
        with self._call_ctx(log):
            out = h.lazy_joint_video_action(None, data, latent_video=lv)
        self.last_log = log.getvalue()
        resets = _RESET_RE.findall(self.last_log)
        reset = resets[-1] if resets else None
        # Harvest: the new frame block of both caches, the new latents and chunk.
        kv_now = int(getattr(h, mine)[0].shape[2])
        if reset is not None:
            kv_before = 0
            kv_from = "latent"  # the window's first latent, kept in its latent block
            for branch in self._own:
                w[branch] = []
            w["kv_lang"], w["kv_from"] = [], []
            w["window_start"] = len(w["latents"])
            w["clip_feas"], w["ys"] = _bits(h.clip_feas).clone(), _bits(h.ys).clone()
        if kv_now != kv_before + (self.frame_seqlen if reset else self.nfpb * self.frame_seqlen):
            raise RuntimeError(f"unexpected KV growth {kv_before} -> {kv_now} (reset: {reset})")
        new = lambda cache: torch.stack([_bits(c[:, :, kv_before:]) for c in cache]).clone()
        for branch in self._own:
            w[branch] = w[branch] + [new(getattr(h, _BRANCH_ATTR[branch]))]
        w["kv_lang"] = w["kv_lang"] + [text.cpu().clone()]  # the text this block was written under
        w["kv_from"] = w["kv_from"] + [kv_from]
        w["latents"] = w["latents"] + [_bits(out["video_pred"][0]).clone()]  # [C, n, h, w]
        w["chunks"] = w["chunks"] + [out["action_pred"][0].float().cpu().clone()]
        w["actions"] = w["actions"] + [state.float().clone()]
        w["csf"] = int(h.current_start_frame)
        w["language"] = h.language.cpu().clone()
        w["pending_frames"] = None
        self._version += 1
        self._installed = self._version  # the head holds exactly this world now
        return {"reset": reset, "current_start_frame": w["csf"],
                "window_start": w["window_start"], "latent_frames": int(out["video_pred"].shape[2])}  # fmt: skip

    # --- fabric verbs --------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Continue the history under ``prompt``: the reset key moves with the text, so
        DreamZero's "language changed" rule is not tripped; the next calls encode the new
        text as their context."""
        self._require_started()
        self._w["language"] = self._check_prompt(prompt)
        self._w["prompt"] = prompt
        self._version += 1

    def set_seed(self, seed: int) -> None:
        self._require_started()
        self._w["seed"] = int(seed)
        self._version += 1

    def rewind(self, n_blocks: int = 1) -> None:
        """Drop the last ``n_blocks`` frame blocks in place (caches, latents, counters).
        Only inside the current attention window: before it, DreamZero has already dropped
        the context (restore a snapshot instead)."""
        self._require_started()
        w = self._w
        if not isinstance(n_blocks, (int, np.integer)) or n_blocks < 0:
            raise HistoryError(f"n_blocks must be a non-negative int, got {n_blocks!r}")
        in_window = len(w["latents"]) - 1 - w["window_start"]
        if n_blocks > in_window:
            raise WindowError(
                f"cannot rewind {n_blocks} frame blocks in place: the attention window holds "
                f"{in_window} (frames {w['window_start']}..{len(w['latents']) - 1}; "
                f"local_attn_size={self.local_attn_size} latent frames); restore a snapshot "
                "of an earlier frame instead"
            )
        if n_blocks == 0:
            return
        for k in (*self._own, "latents", "chunks", "actions", "kv_lang", "kv_from"):
            w[k] = w[k][: len(w[k]) - n_blocks]
        w["csf"] -= n_blocks * self.nfpb
        w["pending_frames"] = None
        self._version += 1

    def resync(self, frame=None, latent=None, agent_pos=None, block_pose=None):
        """Replace what the next call takes as the current block: ``latent`` (``[C,
        num_frame_per_block, h, w]``, DreamZero's ``latent_video=`` imagination path) or real
        video ``frame`` s (uint8 ``[4, H, W, 3]`` or one ``[H, W, 3]``, VAE-encoded by the
        head as on a robot)."""
        self._require_started()
        if agent_pos is not None or block_pose is not None:
            raise NotImplementedError("dreamzero has no pusher / block state to inject")
        if (frame is None) == (latent is None):
            raise ValueError("give exactly one of frame= or latent=")
        w = self._w
        if latent is not None:
            lat = torch.as_tensor(latent)
            want = (16, self.nfpb, *self._latent_hw())
            if tuple(lat.shape) != want or not torch.isfinite(lat.float()).all():
                raise ValueError(f"latent must be finite {want}, got {tuple(lat.shape)}")
            w["latents"] = w["latents"][:-1] + [_bits(lat.to(torch.bfloat16)).clone()]
            w["pending_frames"] = None
        else:
            f = np.asarray(frame)
            if f.ndim == 3:
                f = np.repeat(f[None], 4, axis=0)
            if f.shape != (4, *self.frame_hw, 3) or f.dtype != np.uint8:
                raise ValueError(
                    f"frame must be uint8 (4, {self.frame_hw}, 3), got {f.dtype} {f.shape}"
                )
            w["pending_frames"] = torch.from_numpy(f.copy())[None]
        self._version += 1
        return self.observe()

    def parallelize(self, device_mesh=None, *, group=None) -> None:
        """Split the CFG branches over two ranks as DreamZero does (``ip_size=2``): rank 0
        runs the conditional branch and holds ``kv_cache1``, rank 1 the negative one and
        ``kv_cache_neg``; they swap predictions every denoising step. ``device_mesh`` goes
        to the head's own ``parallelize`` (an ``"ip"`` dimension); a process ``group`` of
        two ranks is set the same way without a mesh. Snapshots and seeds must then cover
        both ranks: see :mod:`arcfab_gym.models.dreamzero.ranks`."""
        import torch.distributed as dist

        if device_mesh is not None:
            self.head.parallelize(device_mesh)
        else:
            self.head.ip_rank, self.head.ip_size = dist.get_rank(group), dist.get_world_size(group)
            self.head.ip_group = group
        if self.head.ip_size != 2:
            raise ValueError(f"DreamZero splits over exactly 2 ranks, got {self.head.ip_size}")
        self.rank, self.ranks = int(self.head.ip_rank), 2
        self._own = ("kv1",) if self.rank == 0 else ("kvn",)
        self._w, self._installed = None, None

    def _latent_hw(self) -> tuple[int, int]:
        return self.frame_hw[0] // 8, self.frame_hw[1] // 8

    # --- state ---------------------------------------------------------------------------------
    def extract_state(self) -> ModelState:
        """The whole working state. Frame-block tensors are shared, not copied: they are
        never written again by anyone (a checkpoint costs O(new frames))."""
        self._require_started()
        w = self._w
        if self.kv_storage == "blocks" and any(b is None for b in w[self._own[0]]):
            self._install(w)  # a state without cache bytes was loaded: rebuild them first
        t: dict[str, torch.Tensor] = {
            "language": w["language"].clone(),
            "clip_feas": w["clip_feas"], "ys": w["ys"],
            "action_chunks": torch.stack(w["chunks"]), "actions": torch.stack(w["actions"]),
        }  # fmt: skip
        recompute = self.kv_storage == "recompute"
        for branch in self._own:
            for k, block in enumerate(w[branch]):
                if not (recompute and w["kv_from"][k] == "latent"):
                    t[f"{_BRANCH_ATTR[branch]}/{k:04d}"] = block
        t["kv_language"] = torch.cat(w["kv_lang"])  # [blocks, text_len]
        for k, lat in enumerate(w["latents"]):
            t[f"latent_video/{k:05d}"] = lat
        if w["pending_frames"] is not None:
            t["pending_frames"] = w["pending_frames"].clone()
        meta = {
            "state_version": STATE_VERSION,
            "prompt": w["prompt"], "seed": w["seed"], "current_start_frame": w["csf"],
            "window_start": w["window_start"], "frames": len(w["latents"]),
            "local_attn_size": self.local_attn_size, "num_frame_per_block": self.nfpb,
            "frame_seqlen": self.frame_seqlen, "kv_cache_layout": "[layers, 2 (k, v), B, tokens, heads, head_dim]",
            "bf16_as": "int16 bit pattern", "kv_storage": self.kv_storage,
            "kv_blocks": len(w[self._own[0]]), "kv_from": list(w["kv_from"]),
            # Dead state: allocated by the head, never read or written by its forward pass.
            "crossattn_cache_shape": self._crossattn_shape(),
            "crossattn_cache_neg_shape": self._crossattn_shape(),
            "weights": self.config().get("checkpoint") or f"tiny-{self.tiny_seed}",
        }  # fmt: skip
        if self.ranks > 1:
            meta["rank"], meta["ranks"] = self.rank, self.ranks
        return ModelState(tensors=t, meta=meta)

    def load_state(self, state: ModelState, *, include_rng: bool = True) -> None:
        t, meta = state.tensors, state.meta
        if meta.get("state_version") != STATE_VERSION or "current_start_frame" not in meta:
            raise StateMismatchError(f"not a {self.name} state of version {STATE_VERSION}")
        mine = self.config().get("checkpoint") or f"tiny-{self.tiny_seed}"
        if meta.get("weights") != mine:
            raise StateMismatchError(
                f"state was made by weights {meta.get('weights')!r}, this model has {mine!r}"
            )
        if (meta["local_attn_size"], meta["num_frame_per_block"], meta["frame_seqlen"]) != (
            self.local_attn_size,
            self.nfpb,
            self.frame_seqlen,
        ):
            raise StateMismatchError("state was made with another window / block / token layout")
        self.check_prompt(meta["prompt"])
        n = int(meta["frames"])
        nkv = int(meta.get("kv_blocks", 0))
        # Blocks a "recompute" state leaves out are None: rebuilt when installed.
        kv = {b: [t.get(f"{_BRANCH_ATTR[b]}/{k:04d}") for k in range(nkv)] for b in self._own}
        lat = [t[k] for k in sorted(k for k in t if k.startswith("latent_video/"))]
        kv_from = list(meta.get("kv_from", []))
        missing = [
            k for k in range(nkv) for b in self._own if kv[b][k] is None and kv_from[k] != "latent"
        ]
        if (
            len(lat) != n
            or len(t["action_chunks"]) != n
            or nkv < 1
            or len(kv_from) != nkv
            or len(t["kv_language"]) != nkv
            or missing
        ):
            raise StateMismatchError(
                f"latent_video, action_chunks, kv blocks ({', '.join(_BRANCH_ATTR[b] for b in self._own)})"
                " and frames disagree or are missing"
            )
        seed = int(meta["seed"]) if include_rng or self._w is None else self._w["seed"]
        self._w = {
            "prompt": meta["prompt"], "seed": seed, "language": t["language"].clone(),
            **kv, "latents": lat, "kv_from": kv_from,
            "kv_lang": [x[None].clone() for x in t["kv_language"]],
            "chunks": list(t["action_chunks"].clone()), "actions": list(t["actions"].clone()),
            "window_start": int(meta["window_start"]), "csf": int(meta["current_start_frame"]),
            "clip_feas": t["clip_feas"], "ys": t["ys"],
            "pending_frames": t["pending_frames"].clone() if "pending_frames" in t else None,
        }  # fmt: skip
        self._version += 1

    # --- reading -------------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return 0 if self._w is None else len(self._w["latents"])

    @property
    def prompt(self) -> str:
        return self.prompts[0] if self._w is None else self._w["prompt"]

    @property
    def seed(self) -> int:
        return 0 if self._w is None else self._w["seed"]

    @property
    def current_start_frame(self) -> int:
        self._require_started()
        return self._w["csf"]

    def kv_cache(self, branch: str = "cond") -> list[torch.Tensor]:
        """DreamZero's per-layer view ``[2, B, L, heads, head_dim]`` (bf16) of the working state."""
        self._require_started()
        if any(b is None for b in self._w[self._own[0]]):
            self._install(self._w)
        blocks = self._w["kv1" if branch == "cond" else "kvn"]
        return [
            torch.cat([_unbits(b[i], "cpu") for b in blocks], dim=2) for i in range(self.num_layers)
        ]

    def latent(self, frame_index: int) -> torch.Tensor:
        """The latent block of frame ``frame_index`` ``[16, n, h, w]`` (bf16)."""
        i = self.check_frame_index(frame_index)
        return _unbits(self._w["latents"][i], "cpu")

    def observation_spec(self) -> dict[str, tuple[tuple[int, ...], str, float, float]]:
        return {
            "action_chunk": (
                (self.action_horizon, self.model_action_dim),
                "float32",
                -np.inf,
                np.inf,
            ),
            "frame": ((*self.frame_hw, 3), "uint8", 0, 255),
        }

    def observe(self) -> dict[str, np.ndarray]:
        self._require_started()
        w = self._w
        return as_observation({
            "action_chunk": w["chunks"][-1].numpy().astype(np.float32),
            "frame": self.decode_frame(len(w["latents"]) - 1),
        })  # fmt: skip

    @torch.no_grad()
    def _decode(self, latent_bits: torch.Tensor) -> np.ndarray:
        lat = _unbits(latent_bits, self.device)[None]  # [1, 16, n, h, w]
        with self._call_ctx():
            video = self.head.vae.decode(lat.to(torch.bfloat16), tiled=False)
        video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu().numpy()  # [T, H, W, 3]

    def decode_frame(self, frame_index: int) -> np.ndarray:
        """The last video frame of frame block ``frame_index`` (its last latent decoded)."""
        self._require_started()
        i = self.check_frame_index(frame_index)
        return self._decode(self._w["latents"][i][:, -1:])[-1]

    def embed(self, state: ModelState) -> np.ndarray:
        keys = sorted(k for k in state.tensors if k.startswith("latent_video/"))
        return (
            _unbits(state.tensors[keys[-1]][:, -1], "cpu")
            .float()
            .flatten()
            .numpy()
            .astype(np.float64)
        )

    def spawn(self) -> DreamZero:
        """Another world on the same head (weights shared; each swaps its state in)."""
        return DreamZero(**self.config(), _head=self.head)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "checkpoint": self.checkpoint, "tiny_seed": self.tiny_seed, "device": self.device,
            "tokenizer": self.tokenizer_path, "prompts": list(self.prompts),
            "negative_prompt": self.negative_prompt, "embodiment_id": self.embodiment_id,
            "num_inference_steps": self.num_inference_steps, "cfg_scale": self.cfg_scale,
            "src": self.src, "image_size": list(self.frame_hw), "kv_storage": self.kv_storage,
        }  # fmt: skip
        return cfg

    def _require_started(self) -> None:
        if self._w is None:
            raise RuntimeError(f"{self.name}: call start() (or load_state()) first")
