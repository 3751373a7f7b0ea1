"""Sampled MuZero (Hubert et al. 2021): MCTS over K sampled candidate actions per node.

For continuous (or huge) action spaces each node carries ``K`` candidate actions drawn
from a proposal ``beta`` (a Gaussian policy head, a world model's action proposals, ...).
The search runs MuZero's PUCT over those K arms with the prior corrected as in the paper:
``prior(a) ∝ beta_hat(a) * pi(a) / beta(a)``, where ``beta_hat`` is the empirical
distribution of the samples. When the candidates are drawn from the policy itself
(``beta = pi``, the default) the prior is just ``beta_hat``: uniform over distinct
candidates, a candidate drawn twice counting twice (its copy is masked out).

Candidates come from whatever the model's functions put in their outputs, e.g. a world
model's proposals, or a Gaussian policy head via :func:`gaussian_candidates`::

    def recurrent_fn(params, rng, action, emb):          # action: [B, D]
        emb, reward, value, mean, std = model.step(params, emb, action)
        cands, logp = gaussian_candidates(rng, mean, std, num_samples=8, low=-1, high=1)
        return SampledRecurrentFnOutput(reward, discount, value, cands), emb

    out = sampled_muzero_policy(params, rng, root, recurrent_fn, num_simulations=64)
    out.action                                           # [B, D], one of the candidates
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from planners._search import F32, as_embeddings, as_vector
from planners._tree import Tree, freeze
from planners.mcts import RecurrentFnOutput, RootFnOutput, muzero_policy
from planners.qtransforms import qtransform_by_parent_and_siblings

__all__ = [
    "SampledExtraData",
    "SampledPolicyOutput",
    "SampledRecurrentFnOutput",
    "SampledRootFnOutput",
    "gaussian_candidates",
    "sampled_muzero_policy",
    "sampled_prior_logits",
]


@dataclass(frozen=True)
class SampledRootFnOutput:
    """The model's output at the root: a value and K candidate actions."""

    candidates: np.ndarray  # [B, K, D] candidate actions
    value: np.ndarray  # [B]
    embedding: Any  # [B, ...] numeric array, or a length-B sequence of opaque handles
    log_prior: np.ndarray | None = None  # [B, K] log pi(a_k), with log_sampling
    log_sampling: np.ndarray | None = None  # [B, K] log beta(a_k) of the proposal


@dataclass(frozen=True)
class SampledRecurrentFnOutput:
    """The model's output for the node reached by a continuous action."""

    reward: np.ndarray  # [B]
    discount: np.ndarray  # [B]
    value: np.ndarray  # [B]
    candidates: np.ndarray  # [B, K, D] candidate actions at the new node
    log_prior: np.ndarray | None = None  # [B, K] log pi(a_k), with log_sampling
    log_sampling: np.ndarray | None = None  # [B, K] log beta(a_k)
    invalid_actions: np.ndarray | None = None  # [B, K] bool, candidates never to select


@dataclass(frozen=True)
class SampledExtraData:
    """``Tree.extra_data`` of a sampled search."""

    candidates: np.ndarray  # [B, N, K, D] the candidate actions of every node (0 if unused)


@dataclass(frozen=True)
class SampledPolicyOutput:
    """What :func:`sampled_muzero_policy` returns."""

    action: np.ndarray  # [B, D] the chosen candidate action
    action_index: np.ndarray  # [B] int32, its index among the root candidates
    action_weights: np.ndarray  # [B, K] visit distribution over the root candidates
    candidates: np.ndarray  # [B, K, D] the root candidates
    search_tree: Tree[SampledExtraData]


def sampled_prior_logits(
    candidates: np.ndarray,
    log_prior: np.ndarray | None = None,
    log_sampling: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled MuZero's corrected prior over K candidates, and a mask of repeated ones.

    ``logits = log beta_hat + log_prior - log_sampling``: ``beta_hat(a_k)`` is the fraction
    of the K samples equal to ``a_k``; the correction term is 0 when both log densities are
    None (samples drawn from the policy itself). Repeats of an earlier candidate are
    marked in the mask (the first copy carries their mass).

    Args:
      candidates: ``[B, K, D]``.
      log_prior: ``[B, K]`` log density of each candidate under the policy, or None.
      log_sampling: ``[B, K]`` log density under the proposal that drew it, or None.

    Returns:
      ``(logits [B, K] float32, repeated [B, K] bool)``; repeated candidates get the
      smallest finite logit.
    """
    cands = np.asarray(candidates)
    if cands.ndim != 3:
        raise ValueError(f"candidates must have shape [B, K, D], got {cands.shape}")
    b, k, _ = cands.shape
    same = (cands[:, :, None, :] == cands[:, None, :, :]).all(axis=-1)  # [B, K, K]
    earlier = np.tril(np.ones((k, k), bool), -1)  # [k, j]: j < k
    repeated = (same & earlier).any(axis=-1)  # [B, K]
    counts = same.sum(axis=-1)  # [B, K] copies of each candidate, itself included
    logits = np.log(counts / k)
    if (log_prior is None) != (log_sampling is None):
        raise ValueError(
            "pass both log_prior and log_sampling (the beta_hat/beta correction needs the "
            "policy's and the proposal's densities), or neither when the candidates were "
            "sampled from the policy itself"
        )
    if log_prior is not None:
        lp = np.asarray(log_prior, np.float64)
        ls = np.asarray(log_sampling, np.float64)
        if lp.shape != (b, k) or ls.shape != (b, k):
            raise ValueError(
                f"log_prior and log_sampling must have shape [B, K]=({b}, {k}), "
                f"got {lp.shape} and {ls.shape}"
            )
        logits = logits + lp - ls
    logits = np.where(repeated, np.finfo(F32).min, logits)
    return logits.astype(F32), repeated


def gaussian_candidates(
    rng: np.random.Generator,
    mean: np.ndarray,
    std: np.ndarray,
    num_samples: int,
    *,
    low: float | np.ndarray | None = None,
    high: float | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw K candidate actions per row from a diagonal Gaussian.

    Args:
      rng: the generator to draw from.
      mean, std: ``[B, D]`` (std > 0).
      num_samples: K.
      low, high: optional bounds; samples are clipped into them.

    Returns:
      ``(candidates [B, K, D] float32, log_prob [B, K] float32)``: the log density of the
      unclipped draw, usable as ``log_sampling`` (and ``log_prior`` if the Gaussian is the
      policy).
    """
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    if mean.ndim != 2 or std.shape != mean.shape:
        raise ValueError(f"mean and std must both have shape [B, D], got {mean.shape}, {std.shape}")
    if (std <= 0).any():
        raise ValueError("std must be > 0 everywhere")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    z = rng.standard_normal((mean.shape[0], num_samples, mean.shape[1]))
    draws = mean[:, None] + std[:, None] * z
    log_prob = (-0.5 * z**2 - np.log(std[:, None]) - 0.5 * np.log(2 * np.pi)).sum(axis=-1)
    if low is not None or high is not None:
        draws = np.clip(draws, low, high)
    return draws.astype(F32), log_prob.astype(F32)


def sampled_muzero_policy(
    params: Any,
    rng: np.random.Generator,
    root: SampledRootFnOutput,
    recurrent_fn: Callable[..., tuple[SampledRecurrentFnOutput, Any]],
    num_simulations: int,
    invalid_actions: np.ndarray | None = None,
    max_depth: int | None = None,
    *,
    qtransform: Callable = qtransform_by_parent_and_siblings,
    dirichlet_fraction: float = 0.25,
    dirichlet_alpha: float = 0.3,
    pb_c_init: float = 1.25,
    pb_c_base: float = 19652,
    temperature: float = 1.0,
) -> SampledPolicyOutput:
    """Run Sampled MuZero search over the candidates of each node and pick one.

    Args:
      params: forwarded to ``recurrent_fn``.
      rng: a ``numpy.random.Generator`` (noise, the final sample; passed to
        ``recurrent_fn``, which may draw its candidates from it).
      root: the root's candidates ``[B, K, D]``, value and embedding.
      recurrent_fn: ``(params, rng, action [B, D], embedding) ->
        (SampledRecurrentFnOutput, new_embedding)``; every node must offer the same K.
      num_simulations, max_depth, qtransform, dirichlet_fraction, dirichlet_alpha,
        pb_c_init, pb_c_base, temperature: as in ``muzero_policy``, over the K candidates.
      invalid_actions: ``[B, K]`` candidates never to pick at the root.

    Returns:
      ``SampledPolicyOutput``: the chosen continuous ``action`` [B, D], its index, the
      visit distribution over the root candidates and the tree (``extra_data`` holds the
      candidates of every node; ``embeddings`` are the user's).
    """
    cands0 = np.asarray(root.candidates, F32)
    if cands0.ndim != 3:
        raise ValueError(f"root.candidates must have shape [B, K, D], got {cands0.shape}")
    b, k, d = cands0.shape
    logits0, repeated0 = sampled_prior_logits(cands0, root.log_prior, root.log_sampling)
    invalid0 = repeated0
    if invalid_actions is not None:
        mask = np.asarray(invalid_actions, bool)
        if mask.shape != (b, k):
            raise ValueError(f"invalid_actions must have shape [B, K]=({b}, {k}), got {mask.shape}")
        invalid0 = invalid0 | mask

    # The core search sees integer slots as embeddings; slot s holds a node's candidates
    # and the user's embedding. Root rows take slots 0..B-1, each simulation B more.
    num_slots = b * (num_simulations + 1)
    slot_cands = np.zeros((num_slots, k, d), F32)
    slot_cands[:b] = cands0
    user_emb0 = as_embeddings(root.embedding, b, "root.embedding")
    if user_emb0.dtype != object:
        slot_emb = np.zeros((num_slots,) + user_emb0.shape[1:], user_emb0.dtype)
    else:
        slot_emb = np.empty(num_slots, object)
    slot_emb[:b] = user_emb0
    next_slot = [b]

    def slot_recurrent_fn(params, rng, index, slot):
        action = slot_cands[slot, index]  # [B, D]
        out, new_emb = recurrent_fn(params, rng, action, slot_emb[slot])
        cands = np.asarray(out.candidates, F32)
        if cands.shape != (b, k, d):
            raise ValueError(
                f"recurrent_fn output candidates must have shape [B, K, D]=({b}, {k}, {d}) "
                f"(the same K at every node), got {cands.shape}"
            )
        logits, repeated = sampled_prior_logits(cands, out.log_prior, out.log_sampling)
        invalid = repeated
        if out.invalid_actions is not None:
            extra = np.asarray(out.invalid_actions, bool)
            if extra.shape != (b, k):
                raise ValueError(
                    f"recurrent_fn output invalid_actions must have shape [B, K]=({b}, {k}), "
                    f"got {extra.shape}"
                )
            invalid = invalid | extra
        new_slot = np.arange(next_slot[0], next_slot[0] + b)
        next_slot[0] += b
        slot_cands[new_slot] = cands
        slot_emb[new_slot] = (
            as_embeddings(new_emb, b, "recurrent_fn's new embedding")
            if slot_emb.dtype == object
            else np.asarray(new_emb)
        )
        step = RecurrentFnOutput(
            reward=out.reward,
            discount=out.discount,
            prior_logits=logits,
            value=out.value,
            invalid_actions=invalid if invalid.any() else None,
        )
        return step, new_slot

    out = muzero_policy(
        params,
        rng,
        RootFnOutput(logits0, as_vector(root.value, b, "root.value"), np.arange(b)),
        slot_recurrent_fn,
        num_simulations,
        invalid_actions=invalid0 if invalid0.any() else None,
        max_depth=max_depth,
        qtransform=qtransform,
        dirichlet_fraction=dirichlet_fraction,
        dirichlet_alpha=dirichlet_alpha,
        pb_c_init=pb_c_init,
        pb_c_base=pb_c_base,
        temperature=temperature,
    )
    tree = out.search_tree
    slots = np.asarray(tree.embeddings)  # [B, N]
    used = tree.node_visits > 0
    node_cands = np.where(used[..., None, None], slot_cands[slots], np.float32(0))
    node_emb = slot_emb[slots]
    if node_emb.dtype == object:
        node_emb[~used] = None
    else:
        node_emb = np.where(used.reshape(used.shape + (1,) * (node_emb.ndim - 2)), node_emb, 0)
    tree = freeze(
        dataclasses.replace(
            tree, embeddings=node_emb, extra_data=SampledExtraData(candidates=node_cands)
        )
    )
    index = out.action
    return SampledPolicyOutput(
        action=cands0[np.arange(b), index],
        action_index=index,
        action_weights=out.action_weights,
        candidates=cands0,
        search_tree=tree,
    )
