"""Tests of TrajectoryTree: structure queries, store retain/release, JSON and D3 export."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcfab_gym.errors import (
    ArcFabricError,
    DuplicateNodeError,
    TreeFormatError,
    UnknownCheckpointError,
)
from arcfab_gym.fabric.tree import TREE_FORMAT_VERSION, TrajectoryTree, TreeNode


class CountingStore:
    """A stand-in for the StateManager that counts retain/release calls per id."""

    def __init__(self, held: set[str]):
        self.held = set(held)
        self.retains: Counter[str] = Counter()
        self.releases: Counter[str] = Counter()

    def __contains__(self, checkpoint_id: object) -> bool:
        return checkpoint_id in self.held

    def retain(self, checkpoint_id: str) -> None:
        self.retains[checkpoint_id] += 1

    def release(self, checkpoint_id: str) -> None:
        self.releases[checkpoint_id] += 1


def build_forest(store: CountingStore | None = None) -> TrajectoryTree:
    """Two trees:

    a0 - a1 - a2 - a3          (session a)
          |    `-- d3          (session d, forked at a2)
          |-- b2 - b3          (session b, forked at a1)
          `-- c2               (session c, forked at a1)
    z0 - z1                    (session z, a second root)
    """
    t = TrajectoryTree(store=store)
    t.add_node("a0", "a", 0, prompt="walk", seed=7, kind="checkpoint")
    t.add_node("a1", "a", 1, "a0", reward=0.5)
    t.add_node("a2", "a", 2, "a1", reward=1.0, chosen=True)
    t.add_node("a3", "a", 3, "a2")
    t.add_node("b2", "b", 2, "a1", kind="fork", action=[0.1, -0.2])
    t.add_node("b3", "b", 3, "b2")
    t.add_node("c2", "c", 2, "a1", kind="fork")
    t.add_node("d3", "d", 3, "a2", kind="fork", info={"note": "deep", "n": [1, 2]})
    t.add_node("z0", "z", 0)
    t.add_node("z1", "z", 1, "z0")
    return t


def ids(nodes: list[TreeNode]) -> list[str]:
    return [n.node_id for n in nodes]


# ------------------------------------------------------------------ structure
def test_forest_queries_have_known_answers() -> None:
    t = build_forest()
    assert len(t) == 10
    assert t.roots == ["a0", "z0"]
    assert "b3" in t and "nope" not in t
    assert ids(list(t)) == ["a0", "a1", "a2", "a3", "b2", "b3", "c2", "d3", "z0", "z1"]
    assert ids(t.get_lineage("b3")) == ["a0", "a1", "b2", "b3"]
    assert ids(t.get_lineage("d3")) == ["a0", "a1", "a2", "d3"]
    assert ids(t.get_lineage("z0")) == ["z0"]
    assert ids(t.get_branch("a")) == ["a0", "a1", "a2", "a3"]
    assert ids(t.get_branch("b")) == ["b2", "b3"]
    assert t.get_branch("no-such-session") == []
    assert ids(t.get_leaves()) == ["a3", "b3", "c2", "d3", "z1"]
    assert ids(t.get_fork_points()) == ["a1", "a2"]
    assert ids(t.get_subtree("a1")) == ["a1", "a2", "a3", "d3", "b2", "b3", "c2"]
    assert ids(t.get_children("a1")) == ["a2", "b2", "c2"]
    assert t.depth("b3") == 3 and t.depth("a0") == 0 and t.depth("z1") == 1
    assert ids(t.bfs_order()) == ["a0", "z0", "a1", "z1", "a2", "b2", "c2", "a3", "d3", "b3"]
    assert t.sessions == ["a", "b", "c", "d", "z"]
    node = t.get_node("a0")
    assert node.meta == {"prompt": "walk", "seed": 7, "kind": "checkpoint"}
    assert node.parent_id is None and node.created == 0


def test_branch_is_in_frame_order_not_insertion_order() -> None:
    t = TrajectoryTree()
    t.add_node("r", "s", 0)
    t.add_node("late", "f", 9, "r")
    t.add_node("early", "f", 3, "r")
    assert ids(t.get_branch("f")) == ["early", "late"]


def test_update_node_merges_meta() -> None:
    t = build_forest()
    t.update_node("a1", visits=3, value=0.25)
    t.update_node("a1", visits=4)
    assert t.get_node("a1").meta == {"reward": 0.5, "visits": 4, "value": 0.25}


def test_remove_subtree_prunes_and_reindexes() -> None:
    t = build_forest()
    assert t.remove_subtree("a2") == 3  # a2, a3, d3
    assert ids(t.get_children("a1")) == ["b2", "c2"]
    assert ids(t.get_fork_points()) == ["a1"]
    assert ids(t.get_branch("a")) == ["a0", "a1"]
    assert t.get_branch("d") == []
    assert "d" not in t.sessions
    assert t.remove_subtree("z0") == 2
    assert t.roots == ["a0"]
    t.clear()
    assert len(t) == 0 and t.roots == [] and t.sessions == []


# --------------------------------------------------------------------- errors
def test_duplicate_id_is_rejected_by_name() -> None:
    t = build_forest()
    with pytest.raises(ValueError, match="'a1' is already in the tree") as info:
        t.add_node("a1", "x", 5, "a0")
    assert isinstance(info.value, DuplicateNodeError)
    assert len(t) == 10


def test_unknown_parent_is_rejected_and_tree_unchanged() -> None:
    t = build_forest()
    with pytest.raises(UnknownCheckpointError, match="not in the tree") as info:
        t.add_node("q", "a", 1, "ghost")
    assert "ghost" in str(info.value) and "q" in str(info.value)
    assert "q" not in t and len(t) == 10


def test_unknown_node_lookups_say_not_in_the_tree() -> None:
    t = build_forest()
    for call in (t.get_node, t.get_lineage, t.get_subtree, t.get_children, t.depth,
                 t.remove_subtree):
        with pytest.raises(UnknownCheckpointError, match="not in the tree"):
            call("ghost")
    with pytest.raises(UnknownCheckpointError):
        t.update_node("ghost", x=1)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_frame_index_must_be_a_non_negative_int(bad: object) -> None:
    t = TrajectoryTree()
    with pytest.raises((TypeError, ValueError), match="frame_index must be an int >= 0"):
        t.add_node("x", "s", bad)  # type: ignore[arg-type]
    assert len(t) == 0


def test_frame_index_accepts_numpy_integers() -> None:
    np = pytest.importorskip("numpy")
    t = TrajectoryTree()
    node = t.add_node("x", "s", np.int64(4))
    assert node.frame_index == 4 and type(node.frame_index) is int


def test_meta_must_survive_json() -> None:
    t = TrajectoryTree()
    with pytest.raises(TypeError, match="'action' of node 'x' is not JSON-serialisable"):
        t.add_node("x", "s", 0, action=object())
    with pytest.raises(TypeError, match="round trip"):
        t.add_node("x", "s", 0, action=(1, 2))
    with pytest.raises(ValueError, match="clashes"):
        t.add_node("x", "s", 0, node_id="y")
    assert len(t) == 0


def test_errors_share_the_library_base_class() -> None:
    t = build_forest()
    with pytest.raises(ArcFabricError):
        t.add_node("a0", "a", 0)
    with pytest.raises(ArcFabricError):
        TrajectoryTree.from_json("[]")


# ---------------------------------------------------------------- the store
def test_nodes_retain_and_release_their_checkpoints() -> None:
    held = {"a0", "a1", "a2", "a3", "b2", "b3", "c2", "d3", "z0"}  # z1 is not in the store
    store = CountingStore(held)
    t = build_forest(store)
    assert store.retains == Counter({i: 1 for i in held})
    assert store.releases == Counter()

    assert t.remove_subtree("a2") == 3
    assert store.releases == Counter({"a2": 1, "a3": 1, "d3": 1})

    assert t.remove_subtree("z0") == 2
    # z1 was never retained (the store did not hold it) so it is not released either.
    assert store.releases == Counter({"a2": 1, "a3": 1, "d3": 1, "z0": 1})

    t.clear()
    assert store.releases == Counter({i: 1 for i in held})
    assert store.retains == Counter({i: 1 for i in held})


def test_from_json_retains_into_the_given_store() -> None:
    text = build_forest().to_json()
    store = CountingStore({"a0", "b3"})
    t = TrajectoryTree.from_json(text, store=store)
    assert store.retains == Counter({"a0": 1, "b3": 1})
    t.clear()
    assert store.releases == Counter({"a0": 1, "b3": 1})


def test_store_must_have_the_protocol_methods() -> None:
    with pytest.raises(TypeError, match="retain"):
        TrajectoryTree(store=object())  # type: ignore[arg-type]


# ---------------------------------------------------------------- flat JSON
def assert_same_tree(a: TrajectoryTree, b: TrajectoryTree) -> None:
    assert a.to_dict() == b.to_dict()
    assert list(a.nodes) == list(b.nodes)
    assert a.nodes == b.nodes  # dataclass equality: children lists, meta, created
    assert a.roots == b.roots
    assert a.sessions == b.sessions


def test_json_round_trip_is_exact() -> None:
    t = build_forest()
    t.remove_subtree("c2")  # leaves a gap in the created counter
    text = t.to_json(indent=2)
    back = TrajectoryTree.from_json(text)
    assert_same_tree(t, back)
    assert back.to_json(indent=2) == text
    # The insertion counter continues where the original left off.
    assert t.add_node("n", "a", 4, "a3").created == back.add_node("n", "a", 4, "a3").created


def test_to_dict_is_flat_with_a_version() -> None:
    d = build_forest().to_dict()
    assert d["version"] == TREE_FORMAT_VERSION
    assert [n["id"] for n in d["nodes"]][:3] == ["a0", "a1", "a2"]
    assert all(set(n) == {"id", "session_id", "frame_index", "parent_id", "created", "meta"}
               for n in d["nodes"])


def _doc(nodes: list[dict[str, object]], version: object = TREE_FORMAT_VERSION) -> str:
    return json.dumps({"format": "arcfab-trajectory-tree", "version": version, "nodes": nodes})


def _row(nid: str, parent: str | None, created: int = 0) -> dict[str, object]:
    return {"id": nid, "session_id": "s", "frame_index": 0, "parent_id": parent,
            "created": created, "meta": {}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_doc([_row("a", None)], version=99), "version 99 is not supported"),
        (_doc([_row("a", None)], version="1"), "version '1' is not supported"),
        (json.dumps({"format": "other", "version": 1, "nodes": []}), "not a trajectory tree"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (_doc([_row("a", None), _row("b", "ghost", 1)]), "names parent 'ghost'"),
        (_doc([_row("a", None), _row("a", None, 1)]), "'a' appears twice"),
        (_doc([_row("a", "b"), _row("b", "a", 1)]), "cycle"),
        (_doc([_row("r", None), _row("a", "c", 1), _row("b", "a", 2), _row("c", "b", 3)]),
         "cycle"),
        (_doc([_row("a", "a")]), "cycle: 'a' -> 'a'"),
        (_doc([{**_row("a", None), "frame_index": -2}]), "negative frame_index"),
        (_doc([{**_row("a", None), "frame_index": "0"}]), "'frame_index' must be int"),
        (_doc([{k: v for k, v in _row("a", None).items() if k != "meta"}]), "no 'meta'"),
        (_doc([{**_row("a", None), "parent_id": 3}]), "'parent_id' must be a str or null"),
    ],
)
def test_from_json_rejects_bad_documents(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        TrajectoryTree.from_json(text)
    assert isinstance(info.value, TreeFormatError)


def test_from_json_accepts_children_listed_before_parents() -> None:
    doc = _doc([_row("b", "a", 1), _row("a", None, 0)])
    t = TrajectoryTree.from_json(doc)
    assert t.roots == ["a"] and ids(t.get_children("a")) == ["b"]


# --------------------------------------------------------------- D3 export
def test_d3_tree_single_root_and_forest() -> None:
    t = build_forest()
    forest = t.to_d3_tree()
    assert forest["name"] == "forest" and forest["id"] is None
    assert [c["id"] for c in forest["children"]] == ["a0", "z0"]
    a1 = forest["children"][0]["children"][0]
    assert a1["name"] == "a1" and a1["session_id"] == "a" and a1["frame_index"] == 1
    assert a1["meta"] == {"reward": 0.5}
    assert [c["id"] for c in a1["children"]] == ["a2", "b2", "c2"]
    assert json.loads(t.to_d3_json()) == forest

    t.remove_subtree("z0")
    single = t.to_d3_tree()
    assert single["id"] == "a0" and single["name"] == "a0"
    assert json.loads(t.to_d3_json()) == single

    empty = TrajectoryTree()
    assert empty.to_d3_tree() == {"name": "forest", "id": None, "children": []}
    assert json.loads(empty.to_d3_json()) == empty.to_d3_tree()


def test_d3_export_does_not_alias_meta() -> None:
    t = build_forest()
    t.to_d3_tree()["children"][0]["meta"]["prompt"] = "changed"
    assert t.get_node("a0").meta["prompt"] == "walk"


def test_d3_json_parses_back_on_a_300_deep_chain() -> None:
    # Each tree level is two JSON levels (object + children list); json.loads recurses,
    # so 300 tree levels is as deep as it can check with the default recursion limit.
    t = TrajectoryTree()
    prev = None
    for i in range(300):
        t.add_node(f"n{i}", "s", i, prev, reward=i / 10, note='quote " and </script>')
        prev = f"n{i}"
    t.add_node("side", "f", 5, "n4")
    assert json.loads(t.to_d3_json()) == t.to_d3_tree()


# --------------------------------------------------------------- deep trees
def test_100k_chain_without_recursion() -> None:
    n = 100_000
    limit = sys.getrecursionlimit()
    t = TrajectoryTree()
    prev = None
    for i in range(n):
        t.add_node(f"c{i}", "main", i, prev, reward=0.5)
        prev = f"c{i}"
    deepest = f"c{n - 1}"

    d3 = t.to_d3_tree()
    depth, node = 0, d3
    while node["children"]:
        node = node["children"][0]
        depth += 1
    assert depth == n - 1 and node["id"] == deepest

    text = t.to_d3_json()
    assert text.startswith('{"name": "c0", "id": "c0"')
    assert text.count('"children": [') == n
    assert text.endswith("]}" * n)
    assert text.count(", ") >= n  # sanity: one comma-separated record per node

    flat = t.to_json()
    back = TrajectoryTree.from_json(flat)
    assert len(back) == n and back.to_json() == flat

    lineage = t.get_lineage(deepest)
    assert len(lineage) == n and lineage[0].node_id == "c0" and lineage[-1].node_id == deepest
    assert t.depth(deepest) == n - 1
    assert len(t.get_subtree("c0")) == n
    assert ids(t.get_leaves()) == [deepest]

    assert t.remove_subtree("c0") == n
    assert len(t) == 0 and t.roots == []
    assert sys.getrecursionlimit() == limit


# --------------------------------------------------------------- properties
@st.composite
def random_forests(draw: st.DrawFn) -> TrajectoryTree:
    t = TrajectoryTree()
    count = draw(st.integers(0, 40))
    for i in range(count):
        existing = list(t.nodes)
        parent = draw(st.one_of(st.none(), st.sampled_from(existing))) if existing else None
        frame = 0 if parent is None else t.nodes[parent].frame_index + 1
        session = draw(st.sampled_from(["s0", "s1", "s2"]))
        reward = draw(st.floats(-5, 5, allow_nan=False))
        t.add_node(f"n{i}", session, frame, parent, reward=reward)
    return t


@settings(max_examples=60, deadline=None)
@given(random_forests())
def test_random_forests_round_trip_and_stay_consistent(t: TrajectoryTree) -> None:
    back = TrajectoryTree.from_json(t.to_json())
    assert_same_tree(t, back)
    assert json.loads(t.to_d3_json()) == t.to_d3_tree()
    # Subtrees of the roots partition the nodes; every lineage starts at a root.
    assert sum(len(t.get_subtree(r)) for r in t.roots) == len(t)
    for node in t:
        lineage = t.get_lineage(node.node_id)
        assert lineage[0].node_id in t.roots and lineage[-1] is node
        assert len(lineage) == t.depth(node.node_id) + 1
    assert {n.node_id for n in t.get_leaves()} == {n.node_id for n in t if not n.children}
    if t.roots:
        victim = t.roots[-1]
        size = len(t.get_subtree(victim))
        before = len(t)
        assert t.remove_subtree(victim) == size and len(t) == before - size
