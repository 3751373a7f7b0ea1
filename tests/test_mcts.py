"""planners.mcts: behaviour on toy problems with known answers, the extensions beyond mctx
(subtree reuse, interior invalid actions, sampled continuous actions), and parity with mctx.
"""

from __future__ import annotations

import functools

import os

import numpy as np
import pytest

from planners import (
    NodeStats,
    RecurrentFnOutput,
    RootFnOutput,
    SampledRecurrentFnOutput,
    SampledRootFnOutput,
    Tree,
    gaussian_candidates,
    get_subtree,
    gumbel_muzero_policy,
    muzero_policy,
    qtransform_by_min_max,
    qtransform_by_parent_and_siblings,
    qtransform_completed_by_mix_value,
    sampled_muzero_policy,
    sampled_prior_logits,
)

POLICIES = {"muzero": muzero_policy, "gumbel": gumbel_muzero_policy}


# ----------------------------------------------------------------------------------------
# Toy problems


def bandit(rewards: np.ndarray):
    """One-step bandit, one row per batch element: reward = rewards[b, action], then the
    episode ends (discount 0). Uniform prior, zero value. Embedding = the row index."""
    rewards = np.asarray(rewards, np.float32)
    b, a = rewards.shape

    def recurrent_fn(params, rng, action, row):
        out = RecurrentFnOutput(
            reward=rewards[row, action],
            discount=np.zeros(b, np.float32),
            prior_logits=np.zeros((b, a), np.float32),
            value=np.zeros(b, np.float32),
        )
        return out, row

    root = RootFnOutput(np.zeros((b, a), np.float32), np.zeros(b, np.float32), np.arange(b))
    return root, recurrent_fn


class TreeMDP:
    """A deterministic complete binary tree of depth ``depth`` (node s has children 2s+1,
    2s+2 for actions 0, 1), then an absorbing terminal state. Action 0 at the root pays
    0.6 at once; the path 1, 1, ..., 1 pays 2.0 on its last step; everything else pays 0.
    Undiscounted, zero value estimates, uniform prior: the optimal first action is 1, and
    only a search deep enough to reach the delayed reward can see it."""

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth
        n_inner = 2**depth - 1  # states 0 .. n_inner - 1 act; the rest are leaves
        self.terminal = 2 ** (depth + 1) - 1
        num_states = self.terminal + 1
        self.next = np.full((num_states, 2), self.terminal, np.int64)
        self.reward = np.zeros((num_states, 2), np.float32)
        self.discount = np.ones((num_states, 2), np.float32)
        for s in range(n_inner):
            self.next[s] = (2 * s + 1, 2 * s + 2)
        for s in range(n_inner, num_states):
            self.discount[s] = 0.0  # leaves and the terminal end the episode
        self.reward[0, 0] = 0.6
        best = 0
        for _ in range(depth - 1):
            best = 2 * best + 2
        self.reward[best, 1] = 2.0
        self.best_return = 2.0

    def recurrent_fn(self, params, rng, action, state):
        nxt = self.next[state, action]
        b = state.shape[0]
        out = RecurrentFnOutput(
            reward=self.reward[state, action],
            discount=self.discount[state, action],
            prior_logits=np.zeros((b, 2), np.float32),
            value=np.zeros(b, np.float32),
        )
        return out, nxt

    def root(self, batch: int) -> RootFnOutput:
        zeros = np.zeros(batch, np.float32)
        return RootFnOutput(np.zeros((batch, 2), np.float32), zeros, np.zeros(batch, np.int64))


def node_depths(tree: Tree) -> np.ndarray:
    """Depth of every node [B, N] (-1 for unused nodes), from ``parents``."""
    b, n = tree.parents.shape
    depth = np.full((b, n), -1)
    depth[:, 0] = 0
    for i in range(1, n):
        p = tree.parents[:, i]
        depth[:, i] = np.where(p >= 0, depth[np.arange(b), np.maximum(p, 0)] + 1, -1)
    return depth


def check_tree_invariants(tree: Tree) -> None:
    """Parent/child links agree, and a node's visits are 1 + its children's visits."""
    b, n, a = tree.children_index.shape
    for row in range(b):
        for node in range(n):
            if tree.node_visits[row, node] == 0:
                continue
            kids = tree.children_index[row, node]
            for act in range(a):
                kid = kids[act]
                if kid == Tree.UNVISITED:
                    assert tree.children_visits[row, node, act] == 0
                    continue
                assert kid > node
                assert tree.parents[row, kid] == node
                assert tree.action_from_parent[row, kid] == act
                assert tree.children_visits[row, node, act] == tree.node_visits[row, kid]
            assert tree.node_visits[row, node] == 1 + tree.children_visits[row, node].sum()


# ----------------------------------------------------------------------------------------
# Search quality on problems with a known answer


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_bandit_visits_concentrate_on_the_best_arm(kind):
    rng = np.random.default_rng(0)
    rewards = np.stack([rng.permutation([0.1, 0.9, 0.3, 0.5, 0.2, 0.0]) for _ in range(4)])
    root, fn = bandit(rewards)
    # MuZero's default qtransform gives unvisited arms the minimum, so an arm found early
    # is exploited for a while (as in mctx); 128 simulations are enough to settle.
    out = POLICIES[kind](None, np.random.default_rng(1), root, fn, num_simulations=128)
    visits = out.search_tree.children_visits[:, 0]
    best = rewards.argmax(axis=1)
    # The best arm is (one of) the most visited: Sequential Halving ends with the last two
    # arms visited equally often.
    np.testing.assert_array_equal(visits[np.arange(4), best], visits.max(axis=1))
    assert (visits[np.arange(4), best] > 128 / 3).all()
    if kind == "gumbel":  # Gumbel acts with the best arm; MuZero samples by visits
        np.testing.assert_array_equal(out.action, best)
    assert out.search_tree.node_visits[:, 0].tolist() == [129] * 4


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_tree_mdp_finds_the_delayed_reward(kind):
    mdp = TreeMDP(depth=3)
    kwargs = {}
    if kind == "muzero":
        # The default qtransform rates a visited arm worth 0.6 at 1 and unvisited ones at 0,
        # so MuZero would exploit the immediate reward for long; with the known return
        # range it explores enough to find the delayed one.
        kwargs["qtransform"] = functools.partial(qtransform_by_min_max, min_value=0, max_value=2)
    out = POLICIES[kind](
        None, np.random.default_rng(0), mdp.root(3), mdp.recurrent_fn, 100, **kwargs
    )
    tree = out.search_tree
    if kind == "muzero":
        np.testing.assert_array_equal(tree.children_visits[:, 0].argmax(axis=1), [1, 1, 1])
    else:  # Sequential Halving ends with both arms visited equally; the action decides
        np.testing.assert_array_equal(out.action, [1, 1, 1])
    np.testing.assert_allclose(tree.qvalues(0)[:, 1], mdp.best_return, rtol=0.2)
    np.testing.assert_allclose(tree.qvalues(0)[:, 0], 0.6, atol=1e-6)
    check_tree_invariants(tree)


def test_muzero_greedy_action_is_the_most_visited():
    root, fn = bandit(np.array([[0.0, 1.0, 0.2], [0.7, 0.1, 0.0]]))
    out = muzero_policy(None, np.random.default_rng(0), root, fn, 32, temperature=0.0)
    np.testing.assert_array_equal(out.action, [1, 0])
    np.testing.assert_allclose(out.action_weights.sum(axis=1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Invalid actions


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_invalid_root_actions_are_never_visited_nor_chosen(kind):
    rewards = np.array([[1.0, 0.2, 0.3, 0.1], [0.0, 0.5, 2.0, 0.4]], np.float32)
    invalid = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)  # the best arms are invalid
    root, fn = bandit(rewards)
    for seed in range(3):
        out = POLICIES[kind](None, np.random.default_rng(seed), root, fn, 40, invalid)
        visits = out.search_tree.children_visits[:, 0]
        assert (visits[invalid] == 0).all()
        assert not invalid[np.arange(2), out.action].any()
        np.testing.assert_array_equal(out.action_weights[invalid], 0.0)
        np.testing.assert_array_equal(visits[[0, 1], [2, 3]], visits.max(axis=1))


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_interior_invalid_actions_are_never_visited(kind):
    # Action 0 is invalid everywhere below the root, where it would pay 5.
    b, a = 3, 4
    invalid_below = np.zeros((b, a), bool)
    invalid_below[:, 0] = True

    def recurrent_fn(params, rng, action, depth):
        reward = np.where(action == 0, 5.0, 0.1 * action).astype(np.float32)
        out = RecurrentFnOutput(
            reward=reward,
            discount=np.full(b, 0.9, np.float32),
            prior_logits=np.tile(np.array([3.0, 0.0, 0.0, 0.0], np.float32), (b, 1)),
            value=np.zeros(b, np.float32),
            invalid_actions=invalid_below,
        )
        return out, depth + 1

    root = RootFnOutput(np.zeros((b, a), np.float32), np.zeros(b, np.float32), np.zeros(b, int))
    out = POLICIES[kind](None, np.random.default_rng(0), root, recurrent_fn, 50)
    tree = out.search_tree
    used = tree.node_visits[:, 1:] > 0
    assert used.sum() == b * 50
    assert (tree.children_visits[:, 1:, 0] == 0).all()
    assert (tree.children_index[:, 1:, 0] == Tree.UNVISITED).all()
    assert tree.node_invalid_actions[:, 1:, 0][used].all()
    assert (tree.children_prior_logits[:, 1:, 0][used] == np.finfo(np.float32).min).all()
    assert (tree.children_visits[:, 0, 0] > 0).all()  # the root itself is not masked
    assert (tree.children_visits[:, 1:, 1:].sum(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_a_node_with_every_action_invalid_is_re_evaluated_not_passed(kind):
    # Every node below the root is terminal (all actions invalid): no simulation may take
    # an action there; reaching one re-evaluates it, as at max_depth.
    b, a = 2, 3

    def recurrent_fn(params, rng, action, emb):
        out = RecurrentFnOutput(
            reward=action.astype(np.float32),
            discount=np.zeros(b, np.float32),
            prior_logits=np.zeros((b, a), np.float32),
            value=np.zeros(b, np.float32),
            invalid_actions=np.ones((b, a), bool),
        )
        return out, emb

    root = RootFnOutput(np.zeros((b, a), np.float32), np.zeros(b, np.float32), np.zeros(b))
    tree = POLICIES[kind](None, np.random.default_rng(0), root, recurrent_fn, 12).search_tree
    assert (tree.children_visits[:, 1:] == 0).all()
    assert node_depths(tree).max() == 1
    np.testing.assert_array_equal(tree.node_visits[:, 0], 13)
    np.testing.assert_array_equal(tree.children_visits[:, 0].sum(axis=1), 12)
    assert np.isfinite(tree.node_values).all()


# ----------------------------------------------------------------------------------------
# max_depth


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_max_depth_is_respected(kind, max_depth):
    mdp = TreeMDP(depth=5)
    out = POLICIES[kind](
        None, np.random.default_rng(0), mdp.root(2), mdp.recurrent_fn, 40, max_depth=max_depth
    )
    depth = node_depths(out.search_tree)
    assert depth.max() == max_depth
    assert out.search_tree.node_visits[:, 0].tolist() == [41, 41]
    if max_depth == 1:  # only the root's children exist, re-evaluated on every visit
        assert ((out.search_tree.node_visits > 0).sum(axis=1) == 3).all()


def test_bad_budget_and_shapes_raise_clear_errors():
    root, fn = bandit(np.zeros((2, 3)))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_depth"):
        muzero_policy(None, rng, root, fn, 8, max_depth=0)
    with pytest.raises(ValueError, match="num_simulations"):
        gumbel_muzero_policy(None, rng, root, fn, -1)
    with pytest.raises(ValueError, match="invalid_actions"):
        muzero_policy(None, rng, root, fn, 8, invalid_actions=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="root.value"):
        muzero_policy(None, rng, root.replace(value=np.zeros(3)), fn, 8)

    def bad_fn(params, rng, action, emb):
        out, emb = fn(params, rng, action, emb)
        return out.replace(prior_logits=np.zeros((2, 5), np.float32)), emb

    with pytest.raises(ValueError, match="prior_logits"):
        gumbel_muzero_policy(None, rng, root, bad_fn, 8)


# ----------------------------------------------------------------------------------------
# Tree layout


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_every_tree_field_has_its_documented_shape(kind):
    b, a, sims = 3, 5, 17
    rng = np.random.default_rng(0)
    root, fn = bandit(rng.normal(size=(b, a)))
    tree = POLICIES[kind](None, rng, root, fn, sims).search_tree
    n = sims + 1
    expected = {
        "node_visits": ((b, n), np.int32),
        "raw_values": ((b, n), np.float32),
        "node_values": ((b, n), np.float32),
        "parents": ((b, n), np.int32),
        "action_from_parent": ((b, n), np.int32),
        "children_index": ((b, n, a), np.int32),
        "children_prior_logits": ((b, n, a), np.float32),
        "children_visits": ((b, n, a), np.int32),
        "children_rewards": ((b, n, a), np.float32),
        "children_discounts": ((b, n, a), np.float32),
        "children_values": ((b, n, a), np.float32),
        "embeddings": ((b, n), np.int64),
        "root_invalid_actions": ((b, a), np.bool_),
        "node_invalid_actions": ((b, n, a), np.bool_),
    }
    for name, (shape, dtype) in expected.items():
        value = getattr(tree, name)
        assert value.shape == shape, name
        assert value.dtype == dtype, name
        assert not value.flags.writeable, name
    assert (tree.num_actions, tree.num_simulations, tree.batch_size) == (a, sims, b)
    assert Tree.ROOT_INDEX == 0 and Tree.NO_PARENT == -1 and Tree.UNVISITED == -1
    assert (tree.parents[:, 0] == Tree.NO_PARENT).all()
    if kind == "gumbel":
        assert tree.extra_data.root_gumbel.shape == (b, a)
    summary = tree.summary()
    assert summary.visit_counts.shape == summary.qvalues.shape == (b, a)
    assert summary.value.shape == (b,)
    np.testing.assert_allclose(summary.visit_probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(summary.value, tree.node_values[:, 0])
    check_tree_invariants(tree)


def test_opaque_handles_as_embeddings():
    # Embeddings may be arbitrary objects (e.g. checkpoint ids); they are stored, not read.
    b, a = 2, 3

    def recurrent_fn(params, rng, action, handles):
        assert handles.shape == (b,) and handles.dtype == object
        out = RecurrentFnOutput(
            reward=action.astype(np.float32),
            discount=np.ones(b, np.float32),
            prior_logits=np.zeros((b, a), np.float32),
            value=np.zeros(b, np.float32),
        )
        return out, [h + (int(x),) for h, x in zip(handles, action)]

    root = RootFnOutput(np.zeros((b, a), np.float32), np.zeros(b, np.float32), [(), ()])
    tree = gumbel_muzero_policy(None, np.random.default_rng(0), root, recurrent_fn, 10).search_tree
    assert tree.embeddings.shape == (b, 11) and tree.embeddings.dtype == object
    assert tree.embeddings[0, 0] == ()
    for row in range(b):
        for node in range(1, 11):
            path, i = [], node
            while i != 0:
                path.append(int(tree.action_from_parent[row, i]))
                i = tree.parents[row, i]
            assert tree.embeddings[row, node] == tuple(reversed(path))
    # Re-rooting keeps the handles; the next search starts from the stored one.
    sub = get_subtree(tree, np.array([0, 2]))
    assert sub.embeddings[0, 0] == (0,) and sub.embeddings[1, 0] == (2,)
    rng = np.random.default_rng(1)
    again = gumbel_muzero_policy(None, rng, None, recurrent_fn, 5, root_tree=sub)
    assert again.search_tree.embeddings[0, 0] == (0,)
    assert all(len(h) >= 2 for h in again.search_tree.embeddings[0, 1:] if h is not None)


def test_qtransforms_accept_mctx_calling_convention():
    rng = np.random.default_rng(0)
    root, fn = bandit(rng.normal(size=(3, 4)))
    tree = muzero_policy(None, rng, root, fn, 12).search_tree
    root_idx = np.zeros(3, int)
    minmax = functools.partial(qtransform_by_min_max, min_value=-3.0, max_value=3.0)
    for qt in (qtransform_by_parent_and_siblings, qtransform_completed_by_mix_value, minmax):
        by_tree = qt(tree, root_idx)  # [B, A]
        by_stats = qt(NodeStats.from_tree(tree, root_idx))  # [A, B]
        assert by_tree.shape == (3, 4)
        np.testing.assert_allclose(by_tree, by_stats.T)
    visited = tree.children_visits[:, 0] > 0
    q = qtransform_by_parent_and_siblings(tree, root_idx)
    assert ((q >= 0) & (q <= 1)).all() and (q[~visited] == 0).all()


# ----------------------------------------------------------------------------------------
# Subtree reuse


@pytest.mark.parametrize("kind", ["muzero", "gumbel"])
def test_subtree_reuse_keeps_the_chosen_childs_statistics(kind):
    mdp = TreeMDP(depth=4)
    b = 2
    first = POLICIES[kind](None, np.random.default_rng(0), mdp.root(b), mdp.recurrent_fn, 30)
    tree, action = first.search_tree, first.action
    rows = np.arange(b)
    child = tree.children_index[rows, 0, action]
    sub = get_subtree(tree, action)
    np.testing.assert_array_equal(sub.node_visits[:, 0], tree.node_visits[rows, child])
    np.testing.assert_array_equal(sub.node_values[:, 0], tree.node_values[rows, child])
    np.testing.assert_array_equal(sub.children_visits[:, 0], tree.children_visits[rows, child])
    np.testing.assert_array_equal(sub.embeddings[:, 0], tree.embeddings[rows, child])
    assert (sub.parents[:, 0] == Tree.NO_PARENT).all()
    np.testing.assert_array_equal((sub.node_visits > 0).sum(axis=1), sub.node_visits[:, 0])
    check_tree_invariants(sub)

    # Continue from the kept subtree: 20 more simulations on top of its visits.
    state = sub.embeddings[:, 0]
    root = RootFnOutput(np.zeros((b, 2), np.float32), np.zeros(b, np.float32), state)
    second = POLICIES[kind](
        None, np.random.default_rng(1), root, mdp.recurrent_fn, 20, root_tree=sub
    )
    t2 = second.search_tree
    np.testing.assert_array_equal(t2.node_visits[:, 0], sub.node_visits[:, 0] + 20)
    assert (t2.children_visits[:, 0] >= sub.children_visits[:, 0]).all()
    check_tree_invariants(t2)
    # root=None reuses the stored root prior and embedding.
    rng = np.random.default_rng(1)
    third = POLICIES[kind](None, rng, None, mdp.recurrent_fn, 20, root_tree=sub)
    np.testing.assert_array_equal(third.search_tree.node_visits[:, 0], t2.node_visits[:, 0])


def test_get_subtree_of_an_unexpanded_child_needs_a_root():
    root, fn = bandit(np.array([[1.0, 0.0, 0.0]]))
    out = muzero_policy(None, np.random.default_rng(0), root, fn, 2, dirichlet_fraction=0.0)
    unvisited = int(np.flatnonzero(out.search_tree.children_visits[0, 0] == 0)[0])
    sub = get_subtree(out.search_tree, np.array([unvisited]))
    assert (sub.node_visits == 0).all()
    with pytest.raises(ValueError, match="empty"):
        muzero_policy(None, np.random.default_rng(0), None, fn, 4, root_tree=sub)
    again = muzero_policy(None, np.random.default_rng(0), root, fn, 4, root_tree=sub)
    assert again.search_tree.node_visits[0, 0] == 5
    with pytest.raises(ValueError, match="action"):
        get_subtree(out.search_tree, np.array([7]))


# ----------------------------------------------------------------------------------------
# Sampled (continuous) actions


def continuous_bandit(target: float, b: int, k: int, seed: int = 0):
    """1-D actions; reward -(a - target)^2, one step. Candidates from a Gaussian."""
    rng = np.random.default_rng(seed)
    cands, _ = gaussian_candidates(rng, np.zeros((b, 1)), np.ones((b, 1)), k, low=-2, high=2)

    def recurrent_fn(params, rng, action, emb):
        assert action.shape == (b, 1)
        nxt, _ = gaussian_candidates(rng, action, np.full((b, 1), 0.1), k)
        out = SampledRecurrentFnOutput(
            reward=-((action[:, 0] - target) ** 2).astype(np.float32),
            discount=np.zeros(b, np.float32),
            value=np.zeros(b, np.float32),
            candidates=nxt,
        )
        return out, emb

    root = SampledRootFnOutput(cands, np.zeros(b, np.float32), np.zeros(b))
    return root, recurrent_fn


def test_sampled_policy_returns_a_near_best_candidate_from_the_set():
    b, k = 4, 4
    near_best = 0
    for seed in range(5):
        root, fn = continuous_bandit(0.3, b, k, seed)
        out = sampled_muzero_policy(None, np.random.default_rng(seed), root, fn, 64, temperature=0)
        assert out.action.shape == (b, 1) and out.action_weights.shape == (b, k)
        rows = np.arange(b)
        np.testing.assert_array_equal(out.action, root.candidates[rows, out.action_index])
        visits = out.search_tree.children_visits[:, 0]
        np.testing.assert_array_equal(visits[rows, out.action_index], visits.max(axis=1))
        reward = -((root.candidates[..., 0] - 0.3) ** 2)
        near_best += (reward[rows, out.action_index] > reward.max(axis=1) - 0.05).sum()
    assert near_best >= 18  # of 20 rows; PUCT over 4 arms in 64 simulations is not perfect
    tree = out.search_tree
    assert tree.extra_data.candidates.shape == (b, 65, k, 1)
    np.testing.assert_array_equal(tree.extra_data.candidates[:, 0], root.candidates)
    # Interior candidates come from recurrent_fn: centred on the action that led there.
    rows, nodes = np.nonzero(tree.node_visits[:, 1:] > 0)
    nodes = nodes + 1
    cands = tree.extra_data.candidates
    led_here = cands[rows, tree.parents[rows, nodes], tree.action_from_parent[rows, nodes], 0]
    spread = cands[rows, nodes, :, 0] - led_here[:, None]  # drawn with std 0.1
    assert 0 < np.abs(spread).max() < 1.0


def test_sampled_prior_corrects_by_the_empirical_distribution():
    cands = np.array([[[0.5], [1.0], [0.5], [2.0]]], np.float32)  # 0.5 drawn twice
    logits, repeated = sampled_prior_logits(cands)
    np.testing.assert_array_equal(repeated, [[False, False, True, False]])
    np.testing.assert_allclose(logits[0, [0, 1, 3]], np.log([0.5, 0.25, 0.25]), rtol=1e-6)
    # beta_hat * pi / beta: a candidate twice as likely under pi as under beta doubles.
    log_pi = np.log([[0.2, 0.4, 0.2, 0.1]])
    log_beta = np.log([[0.2, 0.2, 0.2, 0.1]])
    logits, _ = sampled_prior_logits(cands, log_pi, log_beta)
    np.testing.assert_allclose(logits[0, 1] - logits[0, 3], np.log(2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="log_sampling"):
        sampled_prior_logits(cands, log_prior=log_pi)

    # The repeated candidate is never visited.
    def recurrent_fn(params, rng, action, emb):
        out = SampledRecurrentFnOutput(
            reward=action[:, 0], discount=np.zeros(1), value=np.zeros(1), candidates=cands
        )
        return out, emb

    root = SampledRootFnOutput(cands, np.zeros(1, np.float32), np.zeros(1))
    out = sampled_muzero_policy(None, np.random.default_rng(0), root, recurrent_fn, 30)
    assert out.search_tree.children_visits[0, 0, 2] == 0
    assert out.action_index[0] != 2


# ----------------------------------------------------------------------------------------
# Parity with mctx (randomness off: dirichlet_fraction=0, gumbel_scale=0)

# (policy, qtransform, B, A, num_simulations, invalid root actions, max_depth). Each
# compiles one mctx search (~3-5 s here), so half of them run only with `-m slow`.
PARITY_CONFIGS = [
    ("muzero", "parent_and_siblings", 8, 16, 64, True, None),
    ("muzero", "min_max", 5, 9, 24, False, None),
    ("muzero", "mix_value", 7, 16, 48, False, 3),
    ("gumbel", "mix_value", 8, 16, 64, True, None),
    ("gumbel", "parent_and_siblings", 6, 12, 32, False, 2),
    ("gumbel", "min_max", 4, 6, 16, False, None),
]
SLOW_PARITY_CONFIGS = [
    ("muzero", "parent_and_siblings", 3, 4, 8, False, None),
    ("muzero", "min_max", 6, 12, 32, True, None),
    ("muzero", "mix_value", 4, 6, 16, True, None),
    ("gumbel", "mix_value", 3, 4, 8, False, None),
    ("gumbel", "parent_and_siblings", 5, 9, 24, True, None),
    ("gumbel", "min_max", 7, 16, 48, True, None),
]
PROBLEMS_PER_CONFIG = 3
NUM_STATES = 40


def random_problem(seed: int, b: int, a: int) -> dict[str, np.ndarray]:
    """A deterministic table MDP with untied random priors, rewards and values."""
    rng = np.random.default_rng(seed)
    discount = rng.uniform(0.8, 1.0, (NUM_STATES, a))
    discount[rng.random((NUM_STATES, a)) < 0.1] = 0.0  # some transitions end the episode
    invalid = rng.random((b, a)) < 0.3
    invalid[:, rng.integers(0, a)] = False  # keep one valid action per row
    return {
        "next": rng.integers(0, NUM_STATES, (NUM_STATES, a)).astype(np.int32),
        "reward": rng.normal(size=(NUM_STATES, a)).astype(np.float32),
        "discount": discount.astype(np.float32),
        "logits": rng.normal(size=(NUM_STATES, a)).astype(np.float32),
        "value": rng.normal(size=NUM_STATES).astype(np.float32),
        "root": rng.integers(0, NUM_STATES, b).astype(np.int32),
        "invalid": invalid,
    }


def numpy_qtransform(name):
    return {
        "parent_and_siblings": qtransform_by_parent_and_siblings,
        "min_max": functools.partial(qtransform_by_min_max, min_value=-4.0, max_value=4.0),
        "mix_value": qtransform_completed_by_mix_value,
    }[name]


def run_numpy(problem, kind, qt_name, sims, use_invalid, max_depth):
    t = problem

    def recurrent_fn(params, rng, action, state):
        nxt = t["next"][state, action]
        out = RecurrentFnOutput(
            t["reward"][state, action], t["discount"][state, action], t["logits"][nxt],
            t["value"][nxt],
        )  # fmt: skip
        return out, nxt

    root = RootFnOutput(t["logits"][t["root"]], t["value"][t["root"]], t["root"])
    noise_off = {"muzero": {"dirichlet_fraction": 0.0}, "gumbel": {"gumbel_scale": 0.0}}[kind]
    return POLICIES[kind](
        None, np.random.default_rng(0), root, recurrent_fn, sims,
        invalid_actions=t["invalid"] if use_invalid else None, max_depth=max_depth,
        qtransform=numpy_qtransform(qt_name), **noise_off,
    )  # fmt: skip


def mctx_search(kind, qt_name, sims, use_invalid, max_depth):
    """A jitted mctx search taking the problem tables as params (compiled once)."""
    try:
        import jax
        import mctx
    except ImportError as exc:
        if os.environ.get("CI"):  # CI installs the parity extra: missing is a failure
            raise
        pytest.skip(f"mctx parity needs the parity extra (pip install -e '.[parity]'): {exc}")
    jnp = jax.numpy
    qtransform = {
        "parent_and_siblings": mctx.qtransform_by_parent_and_siblings,
        "min_max": functools.partial(mctx.qtransform_by_min_max, min_value=-4.0, max_value=4.0),
        "mix_value": mctx.qtransform_completed_by_mix_value,
    }[qt_name]

    def recurrent_fn(t, key, action, state):
        nxt = t["next"][state, action]
        out = mctx.RecurrentFnOutput(
            reward=t["reward"][state, action], discount=t["discount"][state, action],
            prior_logits=t["logits"][nxt], value=t["value"][nxt],
        )  # fmt: skip
        return out, nxt

    @jax.jit
    def search(t):
        root = mctx.RootFnOutput(
            prior_logits=t["logits"][t["root"]], value=t["value"][t["root"]], embedding=t["root"]
        )
        invalid = t["invalid"].astype(jnp.float32) if use_invalid else None
        kwargs = dict(invalid_actions=invalid, max_depth=max_depth, qtransform=qtransform)
        if kind == "muzero":
            out = mctx.muzero_policy(
                t, jax.random.PRNGKey(0), root, recurrent_fn, sims, dirichlet_fraction=0.0,
                **kwargs,
            )  # fmt: skip
        else:
            out = mctx.gumbel_muzero_policy(
                t, jax.random.PRNGKey(0), root, recurrent_fn, sims, gumbel_scale=0.0, **kwargs
            )
        return out.action, out.action_weights, out.search_tree

    return lambda problem: search({k: jnp.asarray(v) for k, v in problem.items()})


def parity_param(config, *marks):
    kind, qt, b, a, sims, inv, depth = config
    name = f"{kind}-{qt}-B{b}A{a}S{sims}{'-inv' if inv else ''}{f'-d{depth}' if depth else ''}"
    return pytest.param(*config, id=name, marks=marks)


@pytest.mark.parametrize(
    "kind,qt_name,b,a,sims,use_invalid,max_depth",
    [parity_param(c) for c in PARITY_CONFIGS]
    + [parity_param(c, pytest.mark.slow) for c in SLOW_PARITY_CONFIGS],
)
def test_parity_with_mctx(kind, qt_name, b, a, sims, use_invalid, max_depth):
    search = mctx_search(kind, qt_name, sims, use_invalid, max_depth)
    for seed in range(PROBLEMS_PER_CONFIG):
        problem = random_problem(1000 * seed + sims + a, b, a)
        ours = run_numpy(problem, kind, qt_name, sims, use_invalid, max_depth)
        action, weights, theirs = search(problem)
        mine = ours.search_tree
        np.testing.assert_array_equal(mine.children_visits, np.asarray(theirs.children_visits))
        np.testing.assert_array_equal(mine.node_visits, np.asarray(theirs.node_visits))
        np.testing.assert_array_equal(mine.children_index, np.asarray(theirs.children_index))
        np.testing.assert_array_equal(mine.parents, np.asarray(theirs.parents))
        np.testing.assert_array_equal(mine.embeddings, np.asarray(theirs.embeddings))
        np.testing.assert_allclose(ours.action_weights, np.asarray(weights), atol=1e-5)
        np.testing.assert_allclose(mine.node_values, np.asarray(theirs.node_values), atol=1e-4)
        if kind == "gumbel":  # deterministic with gumbel_scale=0; MuZero samples
            np.testing.assert_array_equal(ours.action, np.asarray(action))
