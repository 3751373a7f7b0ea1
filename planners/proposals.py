"""Candidate actions for MCTS around a receding-horizon plan (a generic action proposal).

:class:`PlanProposal` keeps a plan ``[H, A]`` between searches, as iCEM keeps its mean:
after each search it takes the search's chosen sequence (the executed action and the
principal variation below it), fills the rest from the old plan, and shifts it by one
step for the next call.

Every node follows a sequence for the steps below it (the root: the plan). Its
candidates, in the order progressive widening unlocks them, each begin a sequence that
their child then follows:

1. the node's own sequence (the warm start: MCTS refines a plan rather than searching a
   fixed set of crude moves);
2. ``num_proposed`` draws of an optional ``proposer(n)`` -- e.g. a world model's own
   action-proposal head (``model.propose_actions``), called with the node's state
   loaded -- as first steps, then the node's sequence;
3. perturbations of the node's sequence by iCEM's coloured noise (``noise_beta``; std
   ``std * std_decay**depth`` in half-widths of the action box), drawn for each node.

So a perturbation at the root moves the whole rest of the sequence smoothly, as an iCEM
sample does, and the tree below it refines that sequence; a leaf's rollout
(:meth:`PlanProposal.rollout`) is the rest of its sequence.

Prior logits: ``plan_mass`` on the plan's step, ``proposal_mass`` shared by the proposals,
the rest shared by the perturbations.

Nothing here knows the task: actions live in a box ``[low, high]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from planners.icem import colored_noise

__all__ = ["PlanProposal"]


class PlanProposal:
    """Warm-start plan + proposals + perturbations (see the module docstring).

    Args:
        low, high: the action box.
        horizon: plan length ``H``.
        num_candidates: candidates per node in all (``A`` slots: 1 plan step, the
            proposals, the rest perturbations).
        std: perturbation std in half-widths of the box.
        rng: where perturbations (and the proposer's draws, if it uses it) come from.
        proposer: ``proposer(n) -> [n, A]`` actions, or None.
        num_proposed: proposals per node (0 without a proposer).
        plan_mass, proposal_mass: prior mass of the plan's step and of the proposals.
        init: the plan at the first call (default: the box's centre, as iCEM's mean).
        noise_beta: colour of the perturbations along time (iCEM's; 2: smooth).
        std_decay: the perturbation std at depth ``d`` is ``std * std_decay**d``.
    """

    def __init__(self, low, high, *, horizon: int, num_candidates: int, std: float,
                 rng: np.random.Generator, proposer: Callable[[int], np.ndarray] | None = None,
                 num_proposed: int = 0, plan_mass: float = 0.3, proposal_mass: float = 0.3,
                 init: np.ndarray | None = None, noise_beta: float = 2.0,
                 std_decay: float = 1.0):  # fmt: skip
        self.low = np.asarray(low, dtype=np.float64)
        self.high = np.asarray(high, dtype=np.float64)
        self.half = (self.high - self.low) / 2.0
        if horizon < 1 or std < 0:
            raise ValueError(f"need horizon >= 1 and std >= 0, got {horizon}, {std}")
        self.num_proposed = num_proposed if proposer is not None else 0
        if num_candidates < 1 + self.num_proposed:
            raise ValueError(f"num_candidates={num_candidates} leaves no slot for the plan "
                             f"and {self.num_proposed} proposals")  # fmt: skip
        self.horizon, self.num_candidates, self.std = int(horizon), int(num_candidates), float(std)
        self.rng, self.proposer = rng, proposer
        self.noise_beta, self.std_decay = float(noise_beta), float(std_decay)
        n_pert = num_candidates - 1 - self.num_proposed
        masses = [plan_mass, proposal_mass if self.num_proposed else 0.0]
        masses.append(max(0.0, 1.0 - sum(masses)) if n_pert else 0.0)
        total = sum(masses)
        if total <= 0 or min(masses) < 0:
            raise ValueError("the prior masses must be >= 0 and not all 0")
        logit = lambda m, k: np.full(k, np.log(max(m / total / max(k, 1), 1e-12)))  # noqa: E731
        self.logits = np.concatenate([logit(masses[0], 1), logit(masses[1], self.num_proposed),
                                      logit(masses[2], n_pert)]).astype(np.float32)  # fmt: skip
        self._init = None if init is None else np.asarray(init, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        """Back to the initial plan (a new episode)."""
        self._tails: dict[tuple[int, bytes], np.ndarray] = {}
        centre = ((self.low + self.high) / 2.0).astype(np.float32)
        self.plan = (np.tile(centre, (self.horizon, 1)) if self._init is None
                     else self._fit(self._init))  # fmt: skip

    def set_plan(self, plan: np.ndarray) -> None:
        """Use ``plan`` (cut or padded with its last step to ``H``) as the warm start."""
        self.plan = self._fit(plan)

    def update(self, sequence: np.ndarray) -> None:
        """After a search: ``sequence`` (executed action first, then the principal
        variation) overrides the plan's first steps; then shift by one for the next call
        (the last step repeated)."""
        seq = np.asarray(sequence, dtype=np.float32).reshape(-1, len(self.low))[: self.horizon]
        plan = self.plan.copy()
        plan[: len(seq)] = seq
        self.plan = np.concatenate([plan[1:], plan[-1:]], axis=0)
        self._tails.clear()

    # --- what WorldSearch calls ---------------------------------------------------------
    def __call__(self, observation, depth: int = 0, action: np.ndarray | None = None):
        """``(actions [num_candidates, A], prior logits)`` at a node ``depth`` below the
        root reached by ``action`` (None at the root)."""
        base = self._sequence(depth, action)  # this node's plan for steps depth .. H-1
        n_pert = self.num_candidates - 1 - self.num_proposed
        seqs = [base[None]]
        if self.num_proposed:  # a proposed first step, then the node's plan
            prop = np.asarray(self.proposer(self.num_proposed), dtype=np.float64)
            seqs.append(np.concatenate([prop[:, None], np.repeat(base[None, 1:], len(prop), 0)], 1))
        if n_pert:
            std = self.std * self.std_decay**depth * self.half
            noise = colored_noise(self.rng, self.noise_beta, (n_pert, len(base), len(self.low)))
            seqs.append(base[None] + std * noise)
        seqs = np.clip(np.concatenate(seqs, axis=0), self.low, self.high).astype(np.float32)
        for seq in seqs:  # what each child is to follow below it
            self._tails[(depth + 1, seq[0].tobytes())] = seq[1:]
        return seqs[:, 0].copy(), self.logits.copy()

    def rollout(self, depth: int, action: np.ndarray | None = None) -> np.ndarray:
        """The rest of the sequence a leaf at ``depth`` (reached by ``action``) belongs to:
        its steps ``depth .. H - 1`` (empty at or beyond the horizon)."""
        if depth >= self.horizon:
            return np.zeros((0, len(self.low)), np.float32)
        return self._sequence(depth, action).astype(np.float32)

    def _sequence(self, depth: int, action: np.ndarray | None) -> np.ndarray:
        """The sequence (steps ``depth .. H - 1``, at least one step) a node follows: the
        tail of the candidate sequence its action began, else the plan's."""
        tail = None
        if action is not None:
            tail = self._tails.get((depth, np.asarray(action, np.float32).tobytes()))
        if tail is None or len(tail) == 0:
            tail = self.plan[min(depth, self.horizon - 1):]
        return np.asarray(tail, dtype=np.float64)

    def _fit(self, plan: np.ndarray) -> np.ndarray:
        plan = np.asarray(plan, dtype=np.float32).reshape(-1, len(self.low))[: self.horizon]
        if len(plan) == 0:
            raise ValueError("an empty plan")
        pad = np.repeat(plan[-1:], self.horizon - len(plan), axis=0)
        return np.clip(np.concatenate([plan, pad]), self.low, self.high).astype(np.float32)
