"""Session: checkpoint / restore / fork / rewind, the tree they record, and a stateful
property test of random operation sequences against a replay oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from arcfab_gym import (
    HistoryError,
    Session,
    StateMismatchError,
    UnknownCheckpointError,
    create_world_model,
)
from arcfab_gym.tasks import pusht

P0, P1 = pusht.PROMPTS[0], pusht.PROMPTS[1]
INIT = np.array([120.0, 380.0, 240.0, 260.0, 0.4])


def acts(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 2))


def new_session(**kwargs) -> Session:
    s = Session(create_world_model("pusht-sim"), **kwargs)
    s.reset(prompt=P0, seed=0, initial_state=INIT)
    return s


def run(session: Session, actions) -> list[tuple]:
    return [session.step(a) for a in actions]


def same(a: list[tuple], b: list[tuple]) -> bool:
    for (o1, r1, t1, _, i1), (o2, r2, t2, _, i2) in zip(a, b, strict=True):
        if r1 != r2 or t1 != t2:
            return False
        if any(not np.array_equal(o1[k], o2[k]) for k in o1):
            return False
        if not np.array_equal(i1["block_pose"], i2["block_pose"]):
            return False
    return True


def test_checkpoint_restore_replays_exactly():
    s = new_session()
    run(s, acts(10))
    cid = s.checkpoint(label="ten")
    expected = run(s, acts(20, seed=1))
    run(s, acts(5, seed=2))
    snap = s.restore(cid)
    assert snap.frame_index == 10 and s.frame_index == 10
    assert same(run(s, acts(20, seed=1)), expected)
    assert s.tree.nodes[cid].meta["label"] == "ten"


def test_fork_with_a_new_prompt_continues_history():
    s = new_session()
    run(s, acts(8))
    cid = s.checkpoint()
    frames = [s.get_decoded_frame(i) for i in range(9)]
    child = s.fork(cid, new_prompt=P1)
    assert child.session_id != s.session_id
    assert child.frame_index == 8, "a fork must not restart from frame 0"
    assert child.prompt == P1 and s.prompt == P0
    for i in range(9):
        if i < 8:  # earlier frames are history, drawn as they were
            np.testing.assert_array_equal(child.get_decoded_frame(i), frames[i])
    np.testing.assert_allclose(child.observe()["goal_pose"], pusht.GOALS[P1], rtol=1e-6)
    np.testing.assert_array_equal(child.observe()["block_pose"], s.observe()["block_pose"])
    # Forks do not disturb each other or their parent.
    expected = run(s, acts(10, seed=3))
    run(child, acts(10, seed=4))
    s.restore(cid)
    assert same(run(s, acts(10, seed=3)), expected)


def test_fork_same_seed_same_actions_is_identical():
    s = new_session()
    run(s, acts(6))
    cid = s.checkpoint()
    a = s.fork(cid, new_seed=123)
    b = s.fork(cid, new_seed=123)
    assert a.seed == b.seed == 123
    assert same(run(a, acts(15, seed=5)), run(b, acts(15, seed=5)))


def test_fork_with_actions_and_default_checkpoint():
    s = new_session()
    run(s, acts(3))
    child = s.fork(actions=acts(4, seed=6))
    assert child.frame_index == 7 and s.frame_index == 3
    assert child.history_length >= 4
    np.testing.assert_array_equal(child.actions[-4:], acts(4, seed=6))


def test_rewind_trims_history_and_replays_exactly():
    s = new_session()
    run(s, acts(5))
    cid = s.checkpoint()
    tail = acts(6, seed=7)
    expected = run(s, tail)
    assert s.rewind(6) == cid, "rewinding onto a checkpoint returns its id"
    assert s.frame_index == 5 and s.history_length == 5
    assert same(run(s, tail), expected)
    assert s.rewind(2) is None
    assert s.frame_index == 9
    with pytest.raises(HistoryError, match="cannot rewind 100 steps.*holds 9 steps"):
        s.rewind(100)
    with pytest.raises(HistoryError):
        s.rewind(-1)
    assert s.frame_index == 9, "a failed rewind changes nothing"


def test_max_rewind_bounds_the_history():
    s = new_session(max_rewind=3)
    run(s, acts(10))
    assert s.history_length == 3
    with pytest.raises(HistoryError):
        s.rewind(4)
    s.rewind(3)
    assert s.frame_index == 7


def test_tree_records_checkpoints_forks_and_rewinds():
    s = new_session()  # the root checkpoint
    root = s.checkpoints[0]
    run(s, acts(4))
    c4 = s.checkpoint()
    run(s, acts(4, seed=1))
    c8 = s.checkpoint()
    s.rewind(4)
    run(s, acts(2, seed=2))
    c6 = s.checkpoint()
    child = s.fork(c4, new_prompt=P1)
    fork_node = child.checkpoints[0]
    tree = s.tree
    assert tree.nodes[c8].parent_id == c4 and tree.nodes[c6].parent_id == c4
    assert tree.nodes[fork_node].parent_id == c4
    assert tree.nodes[fork_node].meta["kind"] == "fork"
    assert tree.nodes[fork_node].meta["prompt"] == P1
    assert [n.node_id for n in tree.get_lineage(fork_node)] == [root, c4, fork_node]
    assert {n.node_id for n in tree.get_fork_points()} == {c4}
    assert {n.node_id for n in tree.get_leaves()} == {c8, c6, fork_node}
    assert [n.node_id for n in tree.get_branch(child.session_id)] == [fork_node]
    # A second episode is a second root.
    s.reset(prompt=P0, seed=1)
    assert len(tree.roots) == 2


def test_tree_nodes_keep_checkpoints_alive_after_close():
    s = new_session()
    run(s, acts(3))
    cid = s.checkpoint()
    store = s.state_manager
    child = s.fork(cid)
    child.close()
    s.close()
    assert cid in store and store.refcount(cid) == 1  # held by the tree only
    with pytest.raises(RuntimeError, match="closed"):
        s.step(np.zeros(2))
    s.close()  # twice is fine


def test_unknown_and_foreign_checkpoints_are_clear_errors():
    s = new_session()
    with pytest.raises(UnknownCheckpointError, match="cp999999"):
        s.restore("cp999999")
    with pytest.raises(UnknownCheckpointError):
        s.fork("nope")
    snap = s.extract_state()
    snap.backend = "some-other-model"
    with pytest.raises(StateMismatchError, match="some-other-model"):
        s.load_snapshot(snap)


def test_store_budget_spills_without_losing_checkpoints(tmp_path):
    s = new_session()
    s.state_manager.close()
    from arcfab_gym import StateManager, TrajectoryTree

    store = StateManager(s.model, max_bytes=4_000, spill_dir=tmp_path)
    s = Session(s.model.spawn(), state_manager=store, tree=TrajectoryTree(store=store))
    s.reset(prompt=P0, seed=0, initial_state=INIT)
    ids, futures = [], []
    for k in range(12):
        run(s, acts(3, seed=k))
        ids.append(s.checkpoint())
    assert store.stats()["spilled"] > 0 and list(tmp_path.glob("*.safetensors"))
    assert store.memory_bytes <= 4_000
    for k, cid in enumerate(ids):
        s.restore(cid)
        futures.append(run(s, acts(5, seed=100 + k)))
    for k, cid in enumerate(ids):
        s.restore(cid)
        assert same(run(s, acts(5, seed=100 + k)), futures[k])


# --- stateful property test against a replay oracle ---------------------------------------
def replay(events) -> object:
    """A fresh backend driven through ``events`` from the start: the oracle."""
    model = create_world_model("pusht-sim")
    for ev in events:
        if ev[0] == "start":
            model.start(ev[1], ev[2], ev[3])
        elif ev[0] == "step":
            model.step(ev[1])
        elif ev[0] == "prompt":
            model.set_prompt(ev[1])
    return model


def drop_last_steps(events: list, n: int) -> list:
    events = list(events)
    while n:
        ev = events.pop()
        n -= ev[0] == "step"
    return events


ACTION = st.tuples(
    st.floats(-1, 1, allow_nan=False, width=32), st.floats(-1, 1, allow_nan=False, width=32)
)


class FabricMachine(RuleBasedStateMachine):
    """Random step / checkpoint / restore / fork / rewind; after each, the active session's
    backend state must equal a fresh replay of its lineage, bit for bit."""

    def __init__(self):
        super().__init__()
        self.root = new_session()
        self.sessions = [self.root]
        self.active = self.root
        self.lineage = {self.root.session_id: [("start", P0, 0, INIT)]}
        self.checkpoints = {}  # id -> lineage at that checkpoint

    @rule(action=ACTION)
    def step(self, action):
        a = np.array(action, dtype=np.float64)
        self.active.step(a)
        self.lineage[self.active.session_id].append(("step", a))

    @rule()
    def checkpoint(self):
        cid = self.active.checkpoint()
        self.checkpoints[cid] = list(self.lineage[self.active.session_id])

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data())
    def restore(self, data):
        cid = data.draw(st.sampled_from(sorted(self.checkpoints)))
        self.active.restore(cid)
        self.lineage[self.active.session_id] = list(self.checkpoints[cid])

    @precondition(lambda self: self.checkpoints)
    @rule(data=st.data(), prompt=st.sampled_from([None, P0, P1]), switch=st.booleans())
    def fork(self, data, prompt, switch):
        cid = data.draw(st.sampled_from(sorted(self.checkpoints)))
        child = self.active.fork(cid, new_prompt=prompt)
        events = list(self.checkpoints[cid])
        if prompt is not None:
            events.append(("prompt", prompt))
        self.lineage[child.session_id] = events
        self.checkpoints[child.checkpoints[0]] = list(events)
        self.sessions.append(child)
        if switch:
            self.active = child

    @rule(n=st.integers(0, 6))
    def rewind(self, n):
        events = self.lineage[self.active.session_id]
        if n > self.active.history_length:
            with pytest.raises(HistoryError):
                self.active.rewind(n)
            return
        self.active.rewind(n)
        self.lineage[self.active.session_id] = drop_last_steps(events, n)

    @invariant()
    def matches_replay(self):
        oracle = replay(self.lineage[self.active.session_id])
        got, want = self.active.model.extract_state(), oracle.extract_state()
        assert got.tensors.keys() == want.tensors.keys()
        for k in got.tensors:
            assert got.tensors[k].numpy().tobytes() == want.tensors[k].numpy().tobytes(), k
        assert got.meta == want.meta
        assert self.active.frame_index == oracle.frame_count - 1

    def teardown(self):
        for s in self.sessions:
            s.close()


FabricMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fabric_operations_match_replay = FabricMachine.TestCase
