"""Bringing DreamZero's own ``WANPolicyHead`` up, in-process, on a GPU or on a CPU.

DreamZero's source is not a dependency of this project: it is found on disk (``src=``, the
``ARCFAB_DREAMZERO_SRC`` environment variable, or ``../shared/vendor/dreamzero`` beside the
repository) and put on ``sys.path``. Nothing of it is copied or edited here.

On a CPU the head cannot run as published; :func:`cpu_call` passes each blocker (listed in
the vendored ``ABOUT.md``) for the duration of one call only, by patching attributes and
restoring them afterwards (monkeypatch style):

* ``torch.cuda.Event`` / ``torch.cuda.synchronize`` (timing code) -> no-op stand-ins;
* ``wan2_1_submodule.flash_attention`` (cross-attention, asserts CUDA) -> DreamZero's own
  ``attention._sdpa_attention_fallback`` (its pre-Ampere path);
* ``FlowUniPCMultistepScheduler`` (makes a CUDA tensor in ``__init__``) -> a subclass that
  builds it with ``device='cuda'`` mapped to the CPU;
* the compiler's stance ``force_eager`` (the scheduler's ``@torch.compile`` methods hit the
  recompile limit on a CPU; ``TORCHDYNAMO_DISABLE=1`` does the same process-wide).

and, on the head instance itself (:func:`prepare_head_for_cpu`): ``_device = "cpu"``,
``trt_engine = None`` (it exists only after ``post_initialize``), ``generate_noise`` drawing
on the CPU, and the weights in bfloat16 (inputs are cast to bf16; float32 fails). The
attention backend is chosen from ``ATTENTION_BACKEND`` when the DiT is built
(:func:`build_head` sets it to ``torch`` for that moment on a CPU).

torchvision is never installed (its wheel pulls a CUDA torch): :func:`install_torchvision_stand_in`
registers a tiny module with a ``__spec__`` that provides the one thing the head uses,
``transforms.v2.Normalize``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: Environment variable naming DreamZero's source folder (the one holding ``groot/``).
SRC_ENV = "ARCFAB_DREAMZERO_SRC"
HEAD_MODULE = "groot.vla.model.dreamzero.action_head.wan_flow_matching_action_tf"
DIT_MODULE = "groot.vla.model.dreamzero.modules.wan_video_dit_action_casual_chunk"
#: What to run to get the packages the head needs on a CPU.
ENABLE_HINT = (
    'install the optional extra (pip install -e ".[dreamzero]") and point '
    f"{SRC_ENV} at DreamZero's source (default: ../shared/vendor/dreamzero beside the repo)"
)


#: Set by ``.ci/run`` when it found no DreamZero source on the machine: the tests then
#: skip (saying so) instead of failing, since the extra cannot bring the source along.
SOURCE_ABSENT_ENV = "ARCFAB_DREAMZERO_SOURCE_ABSENT"


def required_here() -> bool:
    """Whether a missing dreamzero backend is a test failure here: in CI (``CI`` set),
    unless CI found no DreamZero source to point at."""
    return bool(os.environ.get("CI")) and not os.environ.get(SOURCE_ABSENT_ENV)


class DreamZeroUnavailable(RuntimeError):
    """DreamZero's source or the packages it needs are missing."""


# --- finding and importing DreamZero ---------------------------------------------------------
def default_src() -> Path:
    """``../shared/vendor/dreamzero`` next to the repository holding this package."""
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "vendor" / "dreamzero"


def find_src(src: str | os.PathLike[str] | None = None) -> Path:
    """DreamZero's source folder, or :class:`DreamZeroUnavailable` saying how to get one."""
    # An explicit src, else the environment variable, else the vendored copy: the first
    # one given is the only one tried (a wrong setting is reported, not bypassed).
    if src is not None:
        candidates = [Path(src)]
    elif os.environ.get(SRC_ENV):
        candidates = [Path(os.environ[SRC_ENV])]
    else:
        candidates = [default_src()]
    for c in candidates:
        if (c / "groot" / "vla" / "model" / "dreamzero").is_dir():
            return c.resolve()
    raise DreamZeroUnavailable(
        f"DreamZero's source was not found (looked in {', '.join(map(str, candidates))}); "
        + ENABLE_HINT
    )


def missing_packages() -> list[str]:
    """Packages the head imports that are not installed."""
    names = ["diffusers", "transformers", "peft", "einops", "accelerate", "hydra",
             "safetensors", "huggingface_hub"]  # fmt: skip
    return [n for n in names if importlib.util.find_spec(n) is None]


def install_torchvision_stand_in() -> None:
    """Register a minimal ``torchvision`` (never the real one: its wheel pulls CUDA torch).

    Only ``transforms.v2.Normalize`` is used by the head; the image encoder module imports
    ``torchvision.transforms`` at import time but the stand-in encoders never call it.
    Does nothing where a real torchvision is importable."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std, inplace: bool = False):
            super().__init__()
            self.mean, self.std = list(mean), list(std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (-1,) + (1,) * 2
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
            return (x - mean) / std

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    v2 = module("torchvision.transforms.v2", Normalize=Normalize)
    transforms = module("torchvision.transforms", v2=v2, Normalize=Normalize)
    module("torchvision", transforms=transforms, __version__="0.0-arcfab-stand-in")


def import_dreamzero(src: str | os.PathLike[str] | None = None) -> types.ModuleType:
    """Import DreamZero's policy-head module from its source folder and return it."""
    root = find_src(src)
    missing = missing_packages()
    if missing:
        raise DreamZeroUnavailable(f"packages missing for DreamZero: {missing}; " + ENABLE_HINT)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    install_torchvision_stand_in()
    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module(HEAD_MODULE)


def availability(src: str | os.PathLike[str] | None = None) -> str | None:
    """None if the head can be imported, else why not (for skip reasons)."""
    try:
        import_dreamzero(src)
    except DreamZeroUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return f"DreamZero failed to import ({type(exc).__name__}: {exc}); " + ENABLE_HINT
    return None


# --- passing the CPU blockers ----------------------------------------------------------------
class _Patcher:
    """setattr/setenv with undo, like pytest's MonkeyPatch (usable outside tests)."""

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        missing = not hasattr(obj, name)
        old = getattr(obj, name, None)
        self._undo.append((obj, name, old, missing))
        setattr(obj, name, value)

    def setenv(self, name: str, value: str) -> None:
        self._undo.append((os.environ, name, os.environ.get(name), name not in os.environ))
        os.environ[name] = value

    def undo(self) -> None:
        for obj, name, old, missing in reversed(self._undo):
            if obj is os.environ:
                if missing:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
            elif missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.clear()


class _NoEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _CudaToCpu:
    """While active, ``Tensor.to(device='cuda')`` goes to the CPU instead."""

    def __enter__(self):
        self._orig = orig = torch.Tensor.to

        def to(t, *args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
            return orig(t, *args, **kwargs)

        torch.Tensor.to = to
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.to = self._orig


_cpu_scheduler_cache: dict[type, type] = {}


def _cpu_scheduler(cls: type) -> type:
    if cls not in _cpu_scheduler_cache:

        class CPUFlowUniPCMultistepScheduler(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                with _CudaToCpu():
                    super().__init__(*args, **kwargs)

        _cpu_scheduler_cache[cls] = CPUFlowUniPCMultistepScheduler
    return _cpu_scheduler_cache[cls]


def _sdpa_flash_attention(attention_module: types.ModuleType):
    fallback = attention_module._sdpa_attention_fallback

    def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                        q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                        dtype=torch.bfloat16, version=None):  # fmt: skip
        if q_lens is not None or k_lens is not None:
            raise NotImplementedError("padded cross-attention (k_lens) is not used by the head")
        return fallback(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                        q_scale=q_scale, causal=causal, dtype=dtype).type_as(q)  # fmt: skip

    return flash_attention


@contextlib.contextmanager
def cpu_call(log: io.StringIO | None = None) -> Iterator[None]:
    """Run one head call on the CPU: the blockers passed for its duration, its prints
    captured into ``log``."""
    head_mod = sys.modules[HEAD_MODULE]
    sub = importlib.import_module("groot.vla.model.dreamzero.modules.wan2_1_submodule")
    attn = importlib.import_module("groot.vla.model.dreamzero.modules.attention")
    p = _Patcher()
    try:
        p.setattr(torch.cuda, "Event", _NoEvent)
        p.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        p.setattr(sub, "flash_attention", _sdpa_flash_attention(attn))
        p.setattr(head_mod, "FlowUniPCMultistepScheduler",
                  _cpu_scheduler(head_mod.FlowUniPCMultistepScheduler))  # fmt: skip
        with (
            torch.compiler.set_stance("force_eager"),
            contextlib.redirect_stdout(log or io.StringIO()),
        ):
            yield
    finally:
        p.undo()


@contextlib.contextmanager
def gpu_call(log: io.StringIO | None = None) -> Iterator[None]:
    """Run one head call on a GPU as published (prints captured)."""
    with contextlib.redirect_stdout(log or io.StringIO()):
        yield


def prepare_head_for_cpu(head: torch.nn.Module) -> torch.nn.Module:
    """Instance-level CPU settings: device, no TensorRT engine, noise drawn on the CPU,
    bfloat16 weights."""
    head._device = "cpu"
    head.trt_engine = None
    cls_noise = type(head).generate_noise

    def generate_noise(shape, seed=None, device="cpu", dtype=torch.float16):
        return cls_noise(head, shape, seed=seed, device="cpu", dtype=dtype)

    head.generate_noise = generate_noise
    head.to(torch.bfloat16)
    head.eval()
    head.requires_grad_(False)
    return head


# --- building a head -------------------------------------------------------------------------
def build_head(config: dict[str, Any], *, device: str = "cpu", src=None) -> torch.nn.Module:
    """``WANPolicyHead(WANPolicyHeadConfig(**config))``: DreamZero's own constructor (its
    hydra ``_target_`` sub-configs instantiated by it), made ready for ``device``."""
    mod = import_dreamzero(src)
    p = _Patcher()
    if device == "cpu":
        p.setenv("ATTENTION_BACKEND", "torch")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            head = mod.WANPolicyHead(mod.WANPolicyHeadConfig(**config))
    finally:
        p.undo()
    if device == "cpu":
        return prepare_head_for_cpu(head)
    head.to(device)
    with contextlib.redirect_stdout(io.StringIO()):
        head.post_initialize()
    return head


def head_config_from_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``WANPolicyHeadConfig`` arguments in a DreamZero checkpoint's ``config.json``
    (``action_head_cfg.config``, hydra keys dropped), with ``skip_component_loading`` set
    so that the head's weights come from the checkpoint, as DreamZero's loader does."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_cfg = cfg.get("action_head_cfg", cfg)
    head_cfg = head_cfg.get("config", head_cfg)
    out = {k: v for k, v in head_cfg.items() if k not in ("_target_", "_recursive_", "_convert_")}
    out["skip_component_loading"] = True
    out["defer_lora_injection"] = False
    return out


def checkpoint_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The head's weights from ``model.safetensors`` or its sharded index (keys under
    ``action_head.``, prefix removed, ``.base_layer.`` folded as DreamZero's loader does)."""
    from safetensors.torch import load_file

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {root}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        for k, v in load_file(str(root / shard)).items():
            if k.startswith("action_head."):
                state[k.removeprefix("action_head.").replace(".base_layer.", ".")] = v
    return state


def load_head_from_checkpoint(path, *, device: str = "cpu", src=None, overrides=None):
    """Build the head from a checkpoint directory (``config.json`` + safetensors weights)."""
    config = head_config_from_checkpoint(path)
    config.update(overrides or {})
    head = build_head(config, device=device, src=src)
    state = checkpoint_state_dict(path)
    missing, unexpected = head.load_state_dict(state, strict=False)
    frozen = ("text_encoder.", "image_encoder.", "vae.")
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the head: missing {missing[:5]}... "
            f"({len(missing)}), unexpected {unexpected[:5]}... ({len(unexpected)})"
        )
    return head
