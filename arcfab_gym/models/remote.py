"""Any registered world model inside a Ray actor, behind the same :class:`WorldModel` contract.

    from arcfab_gym.models.remote import RemoteWorldModel, init_local_ray

    init_local_ray(num_cpus=2)                       # or ray.init(address=...) on a cluster
    model = RemoteWorldModel("mini-dreamzero")       # built in a new actor, by registry name
    model.start(model.prompts[0], seed=0)
    state = model.extract_state()                    # a state *id*: no tensors move
    states, outs = model.step_batch([state] * 8, actions)   # ids in, ids and outputs back
    data = model.export_snapshot(state)              # the snapshot format's bytes, on request

An actor (:class:`WorldHost`) holds model instances and states by id. The client's
states (:class:`RemoteState`) are ids into that actor: ``extract_state``, ``load_state``,
``step_batch`` and ``embed`` send ids and actions and get ids and step outputs back.
Tensors travel only when they are asked for: reading ``state.tensors`` (what a local
checkpoint store needs) fetches them once, and :meth:`RemoteWorldModel.move_state` moves a
state to another actor as the safetensors bytes of
:class:`~arcfab_gym.fabric.snapshot.WorldStateSnapshot`. ``name``, ``config()`` and
therefore snapshots are those of the wrapped backend, so a state taken remotely restores
locally and vice versa, bit for bit.

An actor that dies (killed, its node lost) raises :class:`RemoteWorldError` on the next
call: its states are gone, nothing is replayed silently. Ray is optional
(``pip install -e ".[ray]"``); this module imports it only when an actor is made.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from arcfab_gym.errors import ArcFabricError
from arcfab_gym.models import create_world_model
from arcfab_gym.models.base import ModelState, StepOutput, WorldModel

__all__ = ["RemoteState", "RemoteWorldError", "RemoteWorldModel", "WorldHost", "WorldHostClient",
           "init_local_ray", "require_ray"]  # fmt: skip


class RemoteWorldError(ArcFabricError, RuntimeError):
    """A Ray actor hosting world models died or did not answer: its states are lost."""


def require_ray():
    """Import ray, or say how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the remote backend needs Ray: pip install -e \".[ray]\" (ray==2.60.0)"
        ) from exc
    return ray


def init_local_ray(num_cpus: int | None = None, **kwargs: Any):
    """Start (or join, if one is running in this process) a local Ray instance on the
    loopback address only, without the dashboard or usage reporting; returns ``ray``.
    ``num_cpus=None`` lets Ray count the cores. With ``RAY_ADDRESS`` set (a cluster),
    it connects there instead (``ray.init()`` reads the variable)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require_ray()
    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    elif not ray.is_initialized():
        options = {"num_cpus": num_cpus, "include_dashboard": False,
                   "_node_ip_address": "127.0.0.1", "log_to_driver": False,
                   "configure_logging": False}  # fmt: skip
        options.update(kwargs)
        ray.init(**options)
    return ray


# --- inside the actor -----------------------------------------------------------------------
class WorldHost:
    """What runs inside a Ray actor: world-model instances by handle, states by id.

    Plain Python (no Ray here), so the same object can also be used in-process. States are
    kept until :meth:`release`; a ref is a state id (int) or a :class:`ModelState` sent along.
    """

    def __init__(self, torch_threads: int | None = 1):
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        self._models: dict[int, WorldModel] = {}
        self._states: dict[int, ModelState] = {}
        self._ids = itertools.count(1)

    # models
    def create(self, name: str, kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return self._add(create_world_model(name, **kwargs))

    def spawn(self, handle: int) -> tuple[int, dict[str, Any]]:
        return self._add(self.model(handle).spawn())

    def close_model(self, handle: int) -> None:
        model = self._models.pop(handle, None)
        if model is not None:
            model.close()

    def call(self, handle: int, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("_") or method in ("extract_state", "load_state", "step_batch"):
            raise AttributeError(f"{method!r} is not a remote call (use the id-based verbs)")
        attr = getattr(self.model(handle), method)
        return attr(*args, **kwargs) if callable(attr) else attr

    # states
    def extract(self, handle: int) -> int:
        return self.keep(self.model(handle).extract_state())

    def load(self, handle: int, ref: int | ModelState, include_rng: bool = True) -> None:
        self.model(handle).load_state(self.state(ref), include_rng=include_rng)

    def step_batch(self, handle: int, refs: Sequence[int | ModelState],
                   actions: np.ndarray, render: bool = True) -> tuple[list[int], list[StepOutput]]:
        states, outs = self.model(handle).step_batch([self.state(r) for r in refs], actions,
                                                     render=render)  # fmt: skip
        return [self.keep(s) for s in states], outs

    def embed(self, handle: int, ref: int | ModelState) -> np.ndarray:
        return self.model(handle).embed(self.state(ref))

    def fetch(self, sid: int) -> ModelState:
        return self.state(sid)

    def export_snapshot(self, handle: int, ref: int | ModelState) -> bytes:
        """The state as the bytes of the snapshot format (labelled by a scratch model)."""
        from arcfab_gym.fabric.snapshot import WorldStateSnapshot

        scratch = self._scratch(handle)
        scratch.load_state(self.state(ref))
        return WorldStateSnapshot.from_model(scratch).to_bytes()

    def import_snapshot(self, handle: int, data: bytes) -> int:
        from arcfab_gym.errors import StateMismatchError
        from arcfab_gym.fabric.snapshot import WorldStateSnapshot

        snap = WorldStateSnapshot.from_bytes(data, source="a remote snapshot")
        name = self.model(handle).name
        if snap.backend != name:
            raise StateMismatchError(
                f"snapshot was taken from backend {snap.backend!r}; this actor runs {name!r}"
            )
        return self.keep(snap.model_state)

    def release(self, sids: Sequence[int]) -> None:
        for sid in sids:
            self._states.pop(sid, None)

    # running code next to the model (planners use it for whole searches)
    def run(self, handle: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, host, *args, **kwargs)`` here, next to the model: ``host.state(id)``
        reads a kept state, ``host.keep(state)`` keeps one."""
        return fn(self.model(handle), self, *args, **kwargs)

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "models": len(self._models), "states": len(self._states)}

    # helpers (also used by ``run`` functions)
    def model(self, handle: int) -> WorldModel:
        try:
            return self._models[handle]
        except KeyError:
            raise KeyError(f"no model {handle} on this actor (closed?)") from None

    def state(self, ref: int | ModelState) -> ModelState:
        if isinstance(ref, ModelState):
            return ref
        try:
            return self._states[int(ref)]
        except KeyError:
            raise KeyError(
                f"state {ref} is not on this actor: it was released, or it lives on another "
                "actor (move it with RemoteWorldModel.move_state)"
            ) from None

    def keep(self, state: ModelState) -> int:
        sid = next(self._ids)
        self._states[sid] = state
        return sid

    def _add(self, model: WorldModel) -> tuple[int, dict[str, Any]]:
        handle = next(self._ids)
        self._models[handle] = model
        info = {"name": model.name, "prompts": tuple(model.prompts),
                "action_dim": int(model.action_dim), "frame_size": int(model.frame_size),
                "config": model.config(),
                "exact_step_batch": type(model).step_batch is WorldModel.step_batch}  # fmt: skip
        return handle, info

    def _scratch(self, handle: int) -> WorldModel:
        key = -handle
        if key not in self._models:
            self._models[key] = self.model(handle).spawn()
        return self._models[key]


# --- the client side ----------------------------------------------------------------------
class WorldHostClient:
    """One Ray actor running a :class:`WorldHost`, and the error translation around it.

    Args:
        num_cpus: CPUs the actor reserves in the Ray scheduler.
        torch_threads: torch threads inside the actor (1 keeps N actors on N cores).
        timeout_s: how long one call may take before :class:`RemoteWorldError`.
        options: more ``.options()`` for the actor (``resources``, ``runtime_env`` ...).
    """

    def __init__(self, *, num_cpus: float = 1, torch_threads: int | None = 1,
                 timeout_s: float | None = 600.0, options: dict[str, Any] | None = None):
        ray = require_ray()
        if not ray.is_initialized():
            init_local_ray()
        self._ray = ray
        opts = {"num_cpus": num_cpus, "max_restarts": 0, "max_task_retries": 0,
                **(options or {})}  # fmt: skip
        self.actor = ray.remote(WorldHost).options(**opts).remote(torch_threads)
        self.timeout_s = timeout_s
        self.dead: str | None = None
        self._garbage: list[int] = []
        self._users = 0

    def submit(self, method: str, *args: Any, **kwargs: Any):
        """Send a call without waiting (an ObjectRef); :meth:`get` waits for it."""
        if self.dead is not None:
            raise RemoteWorldError(self.dead)
        if self._garbage:  # ids of states the client dropped; the actor runs calls in order
            garbage, self._garbage = self._garbage, []
            self.actor.release.remote(garbage)
        return getattr(self.actor, method).remote(*args, **kwargs)

    def get(self, refs):
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.RayActorError as exc:
            self.dead = (
                f"the Ray actor hosting world models died ({type(exc).__name__}); its models "
                "and states are lost and nothing was replayed: restart from a snapshot "
                "(RemoteWorldModel.export_snapshot) or a local checkpoint"
            )
            raise RemoteWorldError(self.dead) from exc
        except ray.exceptions.GetTimeoutError as exc:
            raise RemoteWorldError(
                f"a remote world-model call took longer than {self.timeout_s} s (an actor "
                "also waits here while the cluster has no free CPU for it: each reserves "
                "num_cpus until it is killed)"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(self.submit(method, *args, **kwargs))

    def forget(self, sid: int) -> None:
        self._garbage.append(sid)

    def kill(self) -> None:
        """End the actor (its models and states with it)."""
        if self.dead is None:
            self.dead = "this actor was shut down"
        self._ray.kill(self.actor, no_restart=True)


class RemoteState(ModelState):
    """A state held by an actor: its id there. ``tensors`` / ``meta`` fetch it (once)."""

    def __init__(self, client: WorldHostClient, sid: int):  # no dataclass fields set here
        self._client = client
        self.sid = int(sid)
        self._local: ModelState | None = None
        weakref.finalize(self, client.forget, self.sid)

    def fetch(self) -> ModelState:
        if self._local is None:
            self._local = self._client.call("fetch", self.sid)
        return self._local

    @property
    def tensors(self):  # type: ignore[override]
        return self.fetch().tensors

    @property
    def meta(self):  # type: ignore[override]
        return self.fetch().meta

    def on(self, client: WorldHostClient) -> bool:
        return self._client is client

    def __reduce__(self):  # crossing a process boundary by hand: the real tensors go
        local = self.fetch()
        return (ModelState, (local.tensors, local.meta))

    def __repr__(self) -> str:
        return f"RemoteState(id={self.sid})"


class RemoteWorldModel(WorldModel):
    """A registered backend (``backend``, built with ``kwargs``) running in a Ray actor.

    Args:
        backend: registry name (``arcfab_gym.list_world_models()``).
        client: the actor to build it on (default: a new one, shut down with the last
            model on it); ``spawn()`` puts the new instance on the same actor.
        **kwargs: the backend's constructor arguments (paths must exist where the actor
            runs: on a cluster, shared storage).
    """

    def __init__(self, backend: str, *, client: WorldHostClient | None = None,
                 _handle: tuple[int, dict[str, Any]] | None = None, **kwargs: Any):
        self._owns = client is None
        self.client = client if client is not None else WorldHostClient()
        if _handle is None:
            _handle = self.client.call("create", backend, kwargs)
        self.handle, info = _handle
        self.client._users += 1
        self.name = info["name"]  # the wrapped backend's name: snapshots are its own
        self.prompts = tuple(info["prompts"])
        self.action_dim = info["action_dim"]
        self.frame_size = info["frame_size"]
        self._config = info["config"]
        #: Whether the wrapped backend's step_batch is the exact default loop.
        self.exact_step_batch = bool(info["exact_step_batch"])
        self._closed = False

    def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError(f"remote {self.name!r} model is closed")
        return self.client.call("call", self.handle, method, *args)

    def _ref(self, state: ModelState):
        """What to send for ``state``: its id if it lives on this actor, else the state."""
        if isinstance(state, RemoteState):
            return state.sid if state.on(self.client) else state.fetch()
        return state

    # life cycle
    def start(self, prompt, seed, initial_state=None):
        return self._call("start", prompt, seed, initial_state)

    def step(self, action) -> StepOutput:
        return self._call("step", action)

    def step_batch(self, states, actions, *, render=True):
        if self._closed:
            raise RuntimeError(f"remote {self.name!r} model is closed")
        sids, outs = self.client.call("step_batch", self.handle, [self._ref(s) for s in states],
                                      np.asarray(actions), render)  # fmt: skip
        return [RemoteState(self.client, sid) for sid in sids], outs

    # state
    def extract_state(self) -> RemoteState:
        if self._closed:
            raise RuntimeError(f"remote {self.name!r} model is closed")
        return RemoteState(self.client, self.client.call("extract", self.handle))

    def load_state(self, state, *, include_rng=True) -> None:
        self.client.call("load", self.handle, self._ref(state), include_rng)

    def set_prompt(self, prompt) -> None:
        self._call("set_prompt", prompt)

    def set_seed(self, seed) -> None:
        self._call("set_seed", seed)

    # introspection
    @property
    def frame_count(self) -> int:
        return self._call("frame_count")

    @property
    def prompt(self) -> str:
        return self._call("prompt")

    @property
    def seed(self) -> int:
        return self._call("seed")

    def observe(self):
        return self._call("observe")

    def decode_frame(self, frame_index):
        return self._call("decode_frame", frame_index)

    def embed(self, state):
        return self.client.call("embed", self.handle, self._ref(state))

    def spawn(self) -> RemoteWorldModel:
        return RemoteWorldModel(self.name, client=self.client,
                                _handle=self.client.call("spawn", self.handle))

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client._users -= 1
        if self.client.dead is None:
            try:
                self.client.call("close_model", self.handle)
            except RemoteWorldError:
                pass
            if self._owns and self.client._users <= 0:
                self.client.kill()

    # code next to the model
    def submit_run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        """Start ``fn(model, host, *args, **kwargs)`` in the actor (see :meth:`WorldHost.run`)
        without waiting; ``self.client.get(ref)`` waits for the result."""
        return self.client.submit("run", self.handle, fn, *args, **kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.client.get(self.submit_run(fn, *args, **kwargs))

    # snapshots between actors, only when asked
    def export_snapshot(self, state: ModelState | None = None) -> bytes:
        """``state`` (default: the current one) as the snapshot format's bytes."""
        state = self.extract_state() if state is None else state
        return self.client.call("export_snapshot", self.handle, self._ref(state))

    def import_snapshot(self, data: bytes) -> RemoteState:
        """A state on this model's actor from the snapshot format's bytes."""
        return RemoteState(self.client, self.client.call("import_snapshot", self.handle, data))

    def move_state(self, state: RemoteState, to: RemoteWorldModel) -> RemoteState:
        """``state`` copied onto ``to``'s actor (as snapshot bytes; an id if it is there)."""
        if isinstance(state, RemoteState) and state.on(to.client):
            return state
        return to.import_snapshot(self.export_snapshot(state))
