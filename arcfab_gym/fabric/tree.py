"""The trajectory tree: every checkpoint of the state layer as a node, forks as branches.

A node's id is its checkpoint id. A node whose checkpoint lives in a store keeps it alive
(``store.retain`` when added, ``store.release`` when removed), so exploring a branch never
loses the states the tree still points at. Several roots are allowed (a forest).

Trees get deep (one node per frame, 100,000 frames is an ordinary long run), so every
traversal and every exporter here uses explicit stacks: nothing recurses, and the
interpreter's recursion limit never matters.
"""

from __future__ import annotations

import gc
import json
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol, runtime_checkable

from arcfab_gym.errors import DuplicateNodeError, TreeFormatError, UnknownCheckpointError

#: Name and version written by :meth:`TrajectoryTree.to_dict`; :meth:`from_json` reads only these.
TREE_FORMAT = "arcfab-trajectory-tree"
TREE_FORMAT_VERSION = 1

# Keys the exporters own; a meta key with one of these names would be ambiguous.
_RESERVED_META_KEYS = frozenset({"checkpoint_id", "node_id", "session_id", "frame_index", "parent_id"})


@runtime_checkable
class CheckpointStore(Protocol):
    """What the tree needs from a checkpoint store (the StateManager fits)."""

    def retain(self, checkpoint_id: str) -> Any: ...

    def release(self, checkpoint_id: str) -> Any: ...

    def __contains__(self, checkpoint_id: object) -> bool: ...


@dataclass
class TreeNode:
    """One checkpoint in the tree.

    ``meta`` holds JSON-serialisable facts about the step that produced it: prompt, seed,
    action, reward, visits, value, chosen, kind ("checkpoint", "fork", ...). ``created``
    is the tree's insertion counter, so ordering by it is ordering by insertion.
    """

    node_id: str
    session_id: str
    frame_index: int
    parent_id: str | None
    children: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    created: int = 0


_SCALAR_TYPES = (str, int, float, bool, type(None))


def _check_meta(node_id: str, meta: dict[str, Any]) -> None:
    """Reject meta that would not survive a JSON round trip, naming the node and the fix."""
    for key, value in meta.items():
        if key in _RESERVED_META_KEYS:
            raise ValueError(
                f"meta key {key!r} of node {node_id!r} clashes with a node field; rename it"
            )
        # Fast path for the common scalar case; only containers and odd types pay for
        # a trial encoding (this runs once per added node, 100,000 times in a long run).
        if type(value) in _SCALAR_TYPES:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"meta {key!r} of node {node_id!r} is not JSON-serialisable ({exc}); store "
                "plain str/int/float/bool/None values, lists and str-keyed dicts "
                "(numpy: action.tolist(), float(x), int(x))"
            ) from None
        if isinstance(value, tuple) or (
            json.loads(json.dumps(value)) != value and _is_finite_json(value)
        ):
            raise TypeError(
                f"meta {key!r} of node {node_id!r} would change in a JSON round trip (tuples "
                "become lists, non-str dict keys become str); store lists and str-keyed dicts"
            )


def _is_finite_json(value: Any) -> bool:
    # NaN != NaN, so a value holding NaN never compares equal after a round trip; that is
    # not a change worth refusing.
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _check_frame_index(frame_index: Any) -> int:
    # bool is an int subclass but a frame index of True is always a caller's mistake.
    if isinstance(frame_index, bool):
        raise TypeError(f"frame_index must be an int >= 0, got {frame_index!r}")
    try:
        value = operator.index(frame_index)  # accepts numpy integers, refuses floats
    except TypeError:
        raise TypeError(
            f"frame_index must be an int >= 0, got {type(frame_index).__name__} {frame_index!r}"
        ) from None
    if value < 0:
        raise ValueError(f"frame_index must be an int >= 0, got {value}")
    return value


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many acyclic containers.

    Building 100,000 node records otherwise triggers dozens of collections that each walk
    everything already built (about half the export time), and none of it is garbage.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class TrajectoryTree:
    """A forest of checkpoints, keyed by checkpoint id, kept in insertion order."""

    def __init__(self, store: CheckpointStore | None = None) -> None:
        if store is not None:
            missing = [m for m in ("retain", "release", "__contains__") if not hasattr(store, m)]
            if missing:
                raise TypeError(
                    f"store {type(store).__name__} lacks {', '.join(missing)}; pass the "
                    "StateManager (or any object with retain(id), release(id) and `in`), or None"
                )
        self.store = store
        self.nodes: dict[str, TreeNode] = {}
        # dicts used as insertion-ordered sets: O(1) delete keeps remove_subtree linear.
        self._roots: dict[str, None] = {}
        self._sessions: dict[str, dict[str, None]] = {}
        self._retained: set[str] = set()  # ids we retained, so we release only those
        self._counter = 0

    # ----------------------------------------------------------------- basics
    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[TreeNode]:
        return iter(list(self.nodes.values()))

    def __repr__(self) -> str:
        return (
            f"TrajectoryTree({len(self.nodes)} nodes, {len(self._roots)} roots, "
            f"{len(self._sessions)} sessions)"
        )

    @property
    def roots(self) -> list[str]:
        """Ids of the root nodes, in insertion order."""
        return list(self._roots)

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions that recorded nodes, in order of their first node."""
        return list(self._sessions)

    def get_node(self, node_id: str) -> TreeNode:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise UnknownCheckpointError(
                node_id, "not in the tree; add it with TrajectoryTree.add_node first"
            ) from None

    # ------------------------------------------------------------- mutation
    def add_node(
        self,
        checkpoint_id: str,
        session_id: str,
        frame_index: int,
        parent_id: str | None = None,
        **meta: Any,
    ) -> TreeNode:
        """Add one checkpoint as a node (a root when ``parent_id`` is None) and retain it."""
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise TypeError(f"checkpoint_id must be a non-empty str, got {checkpoint_id!r}")
        if not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str, got {session_id!r}")
        if checkpoint_id in self.nodes:
            raise DuplicateNodeError(
                f"node {checkpoint_id!r} is already in the tree; each checkpoint is added once "
                "(use update_node to change its meta)"
            )
        frame = _check_frame_index(frame_index)
        if parent_id is not None and parent_id not in self.nodes:
            raise UnknownCheckpointError(
                parent_id,
                f"the parent of {checkpoint_id!r} is not in the tree; add the parent first, "
                "or pass parent_id=None to start a new root",
            )
        _check_meta(checkpoint_id, meta)
        # Retain before inserting: if the store refuses, the tree is left unchanged.
        self._retain(checkpoint_id)
        node = self._insert(checkpoint_id, session_id, frame, parent_id, meta, self._counter)
        self._counter += 1
        return node

    def _insert(
        self,
        node_id: str,
        session_id: str,
        frame_index: int,
        parent_id: str | None,
        meta: dict[str, Any],
        created: int,
    ) -> TreeNode:
        node = TreeNode(node_id, session_id, frame_index, parent_id, [], meta, created)
        self.nodes[node_id] = node
        if parent_id is None:
            self._roots[node_id] = None
        else:
            self.nodes[parent_id].children.append(node_id)
        self._sessions.setdefault(session_id, {})[node_id] = None
        return node

    def _retain(self, node_id: str) -> None:
        if self.store is not None and node_id in self.store:
            self.store.retain(node_id)
            self._retained.add(node_id)

    def _release(self, node_id: str) -> None:
        if node_id in self._retained:
            self._retained.discard(node_id)
            # The store may already have dropped it (cleared, or freed by its owner):
            # nothing is left to release then.
            if self.store is not None and node_id in self.store:
                self.store.release(node_id)

    def update_node(self, node_id: str, **meta: Any) -> TreeNode:
        """Merge ``meta`` into a node's meta (e.g. visits/value after an MCTS backup)."""
        node = self.get_node(node_id)
        _check_meta(node_id, meta)
        node.meta.update(meta)
        return node

    def remove_subtree(self, node_id: str) -> int:
        """Remove a node and all its descendants, releasing their checkpoints; return the count."""
        node = self.get_node(node_id)
        doomed = self._preorder_ids(node_id)
        if node.parent_id is None:
            del self._roots[node_id]
        else:
            self.nodes[node.parent_id].children.remove(node_id)
        for nid in doomed:
            gone = self.nodes.pop(nid)
            members = self._sessions[gone.session_id]
            del members[nid]
            if not members:
                del self._sessions[gone.session_id]
        # Release after the bookkeeping so a store error cannot leave the tree half-pruned.
        for nid in doomed:
            self._release(nid)
        return len(doomed)

    def clear(self) -> None:
        """Remove every node, releasing every checkpoint the tree retained."""
        ids = list(self.nodes)
        self.nodes.clear()
        self._roots.clear()
        self._sessions.clear()
        for nid in ids:
            self._release(nid)
        self._retained.clear()

    # ------------------------------------------------------------ traversal
    def _preorder_ids(self, node_id: str) -> list[str]:
        out: list[str] = []
        stack = [node_id]
        nodes = self.nodes
        while stack:
            nid = stack.pop()
            out.append(nid)
            # reversed so the first child is visited first
            stack.extend(reversed(nodes[nid].children))
        return out

    def get_children(self, node_id: str) -> list[TreeNode]:
        return [self.nodes[c] for c in self.get_node(node_id).children]

    def get_lineage(self, node_id: str) -> list[TreeNode]:
        """The path root -> ... -> node."""
        node = self.get_node(node_id)
        path = [node]
        while node.parent_id is not None:
            node = self.nodes[node.parent_id]
            path.append(node)
        path.reverse()
        return path

    def depth(self, node_id: str) -> int:
        """Edges between the node and its root (a root has depth 0)."""
        node = self.get_node(node_id)
        d = 0
        while node.parent_id is not None:
            node = self.nodes[node.parent_id]
            d += 1
        return d

    def get_branch(self, session_id: str) -> list[TreeNode]:
        """The nodes ``session_id`` recorded, in frame order ([] for a session with none)."""
        members = self._sessions.get(session_id, {})
        return sorted((self.nodes[n] for n in members), key=lambda n: (n.frame_index, n.created))

    def get_subtree(self, node_id: str) -> list[TreeNode]:
        """The node and its descendants, in preorder (children in insertion order)."""
        self.get_node(node_id)
        return [self.nodes[n] for n in self._preorder_ids(node_id)]

    def get_leaves(self) -> list[TreeNode]:
        """Nodes without children, in insertion order."""
        return [n for n in self.nodes.values() if not n.children]

    def get_fork_points(self) -> list[TreeNode]:
        """Nodes with more than one child, in insertion order."""
        return [n for n in self.nodes.values() if len(n.children) > 1]

    def bfs_order(self) -> list[TreeNode]:
        """All nodes breadth-first from the roots (roots and children in insertion order)."""
        order: list[TreeNode] = [self.nodes[r] for r in self._roots]
        i = 0
        while i < len(order):
            order.extend(self.nodes[c] for c in order[i].children)
            i += 1
        return order

    # ----------------------------------------------------------- flat JSON
    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-able description: nodes in insertion order, each naming its parent.

        Flat on purpose: its JSON nesting depth is constant however deep the tree is.
        """
        with _gc_paused():
            return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        return {
            "format": TREE_FORMAT,
            "version": TREE_FORMAT_VERSION,
            "next_created": self._counter,
            "nodes": [
                {
                    "id": n.node_id,
                    "session_id": n.session_id,
                    "frame_index": n.frame_index,
                    "parent_id": n.parent_id,
                    "created": n.created,
                    "meta": dict(n.meta),  # a copy: editing the export must not edit the tree
                }
                for n in self.nodes.values()
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        with _gc_paused():
            return json.dumps(self._to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any, store: CheckpointStore | None = None) -> TrajectoryTree:
        """Rebuild a tree from :meth:`to_dict` output, validating it first."""
        with _gc_paused():
            return cls._from_dict(data, store)

    @classmethod
    def _from_dict(cls, data: Any, store: CheckpointStore | None) -> TrajectoryTree:
        if not isinstance(data, dict):
            raise TreeFormatError(
                f"a trajectory tree document is a JSON object, got {type(data).__name__}"
            )
        if data.get("format") != TREE_FORMAT:
            raise TreeFormatError(
                f"not a trajectory tree: format is {data.get('format')!r}, expected "
                f"{TREE_FORMAT!r}; pass text written by TrajectoryTree.to_json"
            )
        version = data.get("version")
        if version != TREE_FORMAT_VERSION:
            raise TreeFormatError(
                f"trajectory tree format version {version!r} is not supported (this library "
                f"reads version {TREE_FORMAT_VERSION}); re-export it with a matching arcfab-gym"
            )
        rows = data.get("nodes")
        if not isinstance(rows, list):
            raise TreeFormatError("trajectory tree document has no 'nodes' list")

        by_id: dict[str, dict[str, Any]] = {}
        for i, row in enumerate(rows):
            _check_row(i, row)
            if row["id"] in by_id:
                raise TreeFormatError(
                    f"node {row['id']!r} appears twice in the document (entries "
                    f"{list(by_id).index(row['id'])} and {i}); each id must be unique"
                )
            by_id[row["id"]] = row
        for row in rows:
            parent = row["parent_id"]
            if parent is not None and parent not in by_id:
                raise TreeFormatError(
                    f"node {row['id']!r} names parent {parent!r}, which is not in the "
                    "document; the file is truncated or was edited by hand"
                )
        _check_acyclic(by_id)

        tree = cls(store=store)
        # Nodes keep the document's order; children lists follow it too, which for
        # to_dict output is insertion order, so the round trip is exact.
        for row in rows:
            nid = row["id"]
            tree.nodes[nid] = TreeNode(
                nid, row["session_id"], row["frame_index"], row["parent_id"], [],
                dict(row["meta"]), row["created"],
            )
            tree._sessions.setdefault(row["session_id"], {})[nid] = None
        for row in rows:
            if row["parent_id"] is None:
                tree._roots[row["id"]] = None
            else:
                tree.nodes[row["parent_id"]].children.append(row["id"])
        for nid in tree.nodes:
            tree._retain(nid)
        max_created = max((r["created"] for r in rows), default=-1)
        next_created = data.get("next_created", max_created + 1)
        if not isinstance(next_created, int) or next_created <= max_created:
            next_created = max_created + 1
        tree._counter = next_created
        return tree

    @classmethod
    def from_json(cls, text: str | bytes, store: CheckpointStore | None = None) -> TrajectoryTree:
        """Rebuild a tree from :meth:`to_json` text; malformed input raises TreeFormatError."""
        with _gc_paused():
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TreeFormatError(f"trajectory tree text is not valid JSON: {exc}") from None
            return cls.from_dict(data, store=store)

    # ----------------------------------------------------------- D3 export
    def to_d3_tree(self) -> dict[str, Any]:
        """A nested D3 hierarchy; a synthetic ``forest`` root when there is not exactly one root.

        Built without recursion: every node's dict is made first, then linked to its children.
        """
        with _gc_paused():
            return self._to_d3_tree()

    def _to_d3_tree(self) -> dict[str, Any]:
        made: dict[str, dict[str, Any]] = {}
        for n in self.nodes.values():
            made[n.node_id] = {
                "name": n.node_id,
                "id": n.node_id,
                "session_id": n.session_id,
                "frame_index": n.frame_index,
                "meta": dict(n.meta),
                "children": [],
            }
        for n in self.nodes.values():
            if n.children:
                made[n.node_id]["children"] = [made[c] for c in n.children]
        roots = [made[r] for r in self._roots]
        if len(roots) == 1:
            return roots[0]
        return {"name": "forest", "id": None, "children": roots}

    def to_d3_json(self) -> str:
        """:meth:`to_d3_tree` as JSON text, written with an explicit stack (any depth works).

        :mod:`json` recurses once per nesting level and fails near depth 1,000, so the
        nesting is written here and :mod:`json` only encodes each node's flat fields.
        """
        esc = encode_basestring_ascii  # what json.dumps uses for str, in C
        enc = _ENCODER.encode
        nodes = self.nodes
        parts: list[str] = []

        def head(n: TreeNode) -> str:
            return (
                f'{{"name": {esc(n.node_id)}, "id": {esc(n.node_id)}, '
                f'"session_id": {esc(n.session_id)}, "frame_index": {n.frame_index}, '
                f'"meta": {enc(n.meta) if n.meta else "{}"}, "children": ['
            )

        roots = list(self._roots)
        forest = len(roots) != 1
        if forest:
            parts.append('{"name": "forest", "id": null, "children": [')
        # Stack items: a node id to open, or _CLOSE to end the node opened before its kids.
        stack: list[Any] = []
        for r in reversed(roots):
            stack.append(_CLOSE)
            stack.append(r)
        need_comma = False
        while stack:
            item = stack.pop()
            if item is _CLOSE:
                parts.append("]}")
                need_comma = True
                continue
            if need_comma:
                parts.append(", ")
            n = nodes[item]
            parts.append(head(n))
            need_comma = False
            for c in reversed(n.children):
                stack.append(_CLOSE)
                stack.append(c)
        if forest:
            parts.append("]}")
        return "".join(parts)


_CLOSE = object()
_ENCODER = json.JSONEncoder()


def _check_row(i: int, row: Any) -> None:
    # Fast path first: this runs once per node of documents with 100,000+ nodes.
    if type(row) is dict:
        try:
            if (
                type(row["id"]) is str
                and row["id"]
                and type(row["session_id"]) is str
                and type(row["frame_index"]) is int
                and row["frame_index"] >= 0
                and type(row["created"]) is int
                and type(row["meta"]) is dict
                and (row["parent_id"] is None or type(row["parent_id"]) is str)
            ):
                return
        except KeyError:
            pass
    _explain_bad_row(i, row)


def _explain_bad_row(i: int, row: Any) -> None:
    """Raise the TreeFormatError that says what is wrong with node entry ``i``."""
    if not isinstance(row, dict):
        raise TreeFormatError(f"node entry {i} is {type(row).__name__}, expected an object")
    label = f"node entry {i} ({row.get('id')!r})"
    for key, kind in (
        ("id", str),
        ("session_id", str),
        ("frame_index", int),
        ("created", int),
        ("meta", dict),
    ):
        if key not in row:
            raise TreeFormatError(f"{label} has no {key!r} field")
        if type(row[key]) is not kind:
            raise TreeFormatError(
                f"{label}: field {key!r} must be {kind.__name__}, got {row[key]!r}"
            )
    if not row["id"]:
        raise TreeFormatError(f"node entry {i} has an empty id")
    if row["frame_index"] < 0:
        raise TreeFormatError(f"{label} has a negative frame_index {row['frame_index']}")
    raise TreeFormatError(
        f"{label}: field 'parent_id' must be a str or null, got "
        f"{row.get('parent_id', '<missing>')!r}"
    )


def _check_acyclic(by_id: dict[str, dict[str, Any]]) -> None:
    """Every node must reach a root by following parents; otherwise name one cycle."""
    state: dict[str, int] = {}  # 1 = on the current walk, 2 = known to reach a root
    for start in by_id:
        if state.get(start) == 2:
            continue
        walk: list[str] = []
        nid: str | None = start
        while nid is not None and state.get(nid) != 2:
            if state.get(nid) == 1:
                cycle = walk[walk.index(nid):] + [nid]
                raise TreeFormatError(
                    "the parent links form a cycle: " + " -> ".join(repr(c) for c in cycle)
                    + "; a trajectory tree must be a forest"
                )
            state[nid] = 1
            walk.append(nid)
            nid = by_id[nid]["parent_id"]
        for w in walk:
            state[w] = 2
