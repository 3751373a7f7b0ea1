"""Search over world models (MCTS, CEM/MPPI): pure functions over arrays, backend-agnostic."""

from planners._tree import GumbelMuZeroExtraData, NodeStats, SearchSummary, Tree, get_subtree
from planners.mcts import (
    PolicyOutput,
    RecurrentFnOutput,
    RootFnOutput,
    gumbel_muzero_policy,
    muzero_policy,
)
from planners.qtransforms import (
    qtransform_by_min_max,
    qtransform_by_parent_and_siblings,
    qtransform_completed_by_mix_value,
)
from planners.sampled import (
    SampledExtraData,
    SampledPolicyOutput,
    SampledRecurrentFnOutput,
    SampledRootFnOutput,
    gaussian_candidates,
    sampled_muzero_policy,
    sampled_prior_logits,
)

__all__ = [
    "GumbelMuZeroExtraData",
    "NodeStats",
    "PolicyOutput",
    "RecurrentFnOutput",
    "RootFnOutput",
    "SampledExtraData",
    "SampledPolicyOutput",
    "SampledRecurrentFnOutput",
    "SampledRootFnOutput",
    "SearchSummary",
    "Tree",
    "gaussian_candidates",
    "get_subtree",
    "gumbel_muzero_policy",
    "muzero_policy",
    "qtransform_by_min_max",
    "qtransform_by_parent_and_siblings",
    "qtransform_completed_by_mix_value",
    "sampled_muzero_policy",
    "sampled_prior_logits",
]
