"""Bit-exact capture and restore of a pymunk (Chipmunk 7) space's dynamic state.

pymunk's own ``copy``/``pickle`` is not enough to resume a simulation bit for bit:

* it sets ``position`` through the public setter, which recomputes the centre of gravity
  ``p = transform(cog) + position`` and rounds (the T's centre of gravity is off-origin);
* it drops the bodies' bias velocities ``v_bias``/``w_bias``, which the solver writes in
  one step and the next step's position update consumes;
* it rebuilds the broad phase, whose cached pairs (and their GJK start points) then differ
  from the original's, and it cannot put back the list of active contacts, so contacts
  that separated a moment ago come back in the wrong state.

This module reads and writes the raw ``cpBody`` fields (layout checked at import against
the public getters) and serialises the cached arbiters (contact impulses used for warm
starting). It is exact for a space that keeps no broad-phase history and no lingering
separated contacts: a spatial hash with ``collision_persistence = 1`` (see
:class:`arcfab_gym.models.pusht_sim.PushTSim`). Loading removes and re-adds the dynamic
shapes, which drops the cached contacts, and re-inserts the saved ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pymunk
from pymunk._chipmunk_cffi import ffi, lib

# --- cpBody layout ------------------------------------------------------------------------
# struct cpBody { velocity_func, position_func; m, m_inv, i, i_inv; cog(2); p(2); v(2); f(2);
#                 a; w; t; transform(6); userData; v_bias(2); w_bias; ... }  (doubles)
_P, _TRANSFORM_END = 8, 23  # p .. transform.ty
_V_BIAS, _W_BIAS = 24, 26
#: Doubles saved per body: p, v, f, a, w, t, transform (15) + v_bias, w_bias (3).
BODY_FIELDS = (_TRANSFORM_END - _P) + 3


class PymunkLayoutError(RuntimeError):
    """The installed pymunk's cpBody layout is not the one this module was written for."""


def _check_body_layout() -> None:
    body = pymunk.Body(2.0, 3.0)
    body.center_of_gravity = (0.5, 0.25)
    body.position = (10.0, 20.0)
    body.velocity = (1.5, 2.5)
    body.angle = 0.3
    body.angular_velocity = 0.7
    body.force = (4.0, 5.0)
    body.torque = 6.0
    raw = ffi.cast("double *", body._body)
    expected = {
        2: 2.0, 3: 0.5, 4: 3.0, 6: 0.5, 7: 0.25, 10: 1.5, 11: 2.5, 12: 4.0, 13: 5.0,
        14: 0.3, 15: 0.7, 16: 6.0, 21: body.position.x, 22: body.position.y,
    }  # fmt: skip
    bad = {i: (raw[i], v) for i, v in expected.items() if raw[i] != v}
    if bad:
        raise PymunkLayoutError(
            f"pymunk {pymunk.version} (Chipmunk {pymunk.chipmunk_version}) has an unexpected "
            f"cpBody memory layout (index: (found, expected)) {bad}; exact state capture "
            "needs the Chipmunk 7.0.x layout -- install pymunk 6.x"
        )


_check_body_layout()

# --- arbiters -----------------------------------------------------------------------------
_MAX_CONTACTS = 2  # CP_MAX_CONTACTS_PER_ARBITER
# float row: e, u, surface_vr(2), n(2), then per contact r1(2), r2(2), nMass, tMass,
# bounce, jnAcc, jtAcc, jBias, bias
_CONTACT_F = 11
ARBITER_F = 6 + _MAX_CONTACTS * _CONTACT_F
# int row: shape_a, shape_b, count, swapped, age (steps since last touch), state, hash per
# contact
ARBITER_I = 6 + _MAX_CONTACTS


@dataclass
class SpaceState:
    """The dynamic state of a space, as plain arrays.

    ``bodies``: float64 ``[n_bodies, BODY_FIELDS]``; ``arbiters_f``: float64
    ``[n_arbiters, ARBITER_F]``; ``arbiters_i``: int64 ``[n_arbiters, ARBITER_I]``;
    ``curr_dt``: the last step's dt (scales the cached impulses of the next step). Arbiter
    time stamps are kept as ages, so the live space's step counter never runs backwards
    (Chipmunk recycles contact buffers by age).
    """

    bodies: np.ndarray
    arbiters_f: np.ndarray
    arbiters_i: np.ndarray
    curr_dt: float

    def copy(self) -> SpaceState:
        return SpaceState(
            self.bodies.copy(), self.arbiters_f.copy(), self.arbiters_i.copy(),
            self.curr_dt,
        )  # fmt: skip


class SpaceCodec:
    """Reads and writes the state of one space with a fixed cast of bodies and shapes.

    ``bodies`` are the non-static bodies whose state is saved; ``shapes`` lists every
    shape that can touch another (static ones first), in the order they were first added,
    so that shape ``k`` has Chipmunk hash id ``k``; ``dynamic_shapes`` is the suffix of
    ``shapes`` that :meth:`load` re-adds to drop the live contacts.
    """

    def __init__(
        self,
        space: pymunk.Space,
        bodies: Sequence[pymunk.Body],
        shapes: Sequence[pymunk.Shape],
        n_static: int,
    ):
        self.space = space
        self.bodies = list(bodies)
        self.shapes = list(shapes)
        self.n_static = int(n_static)
        self.dynamic_shapes = self.shapes[self.n_static :]
        self._shape_index = {s._shape: k for k, s in enumerate(self.shapes)}
        self._raw = [ffi.cast("double *", b._body) for b in self.bodies]

    # --- capture ------------------------------------------------------------------------
    def capture(self) -> SpaceState:
        bodies = np.empty((len(self.bodies), BODY_FIELDS), dtype=np.float64)
        for row, raw in zip(bodies, self._raw):
            row[: BODY_FIELDS - 3] = ffi.unpack(raw + _P, BODY_FIELDS - 3)
            row[BODY_FIELDS - 3 :] = ffi.unpack(raw + _V_BIAS, 3)
        arbs = self.space._get_arbiters()
        stamp = int(lib.cpSpaceGetTimestamp(self.space._space))
        arb_f = np.zeros((len(arbs), ARBITER_F), dtype=np.float64)
        arb_i = np.zeros((len(arbs), ARBITER_I), dtype=np.int64)
        for k, arb in enumerate(arbs):
            f, i = arb_f[k], arb_i[k]
            f[0:6] = (arb.e, arb.u, arb.surface_vr.x, arb.surface_vr.y, arb.n.x, arb.n.y)
            i[0:6] = (
                self._shape_index[arb.a], self._shape_index[arb.b], arb.count,
                int(arb.swapped), stamp - arb.stamp, arb.state,
            )  # fmt: skip
            for c in range(arb.count):
                con = arb.contacts[c]
                o = 6 + c * _CONTACT_F
                f[o : o + _CONTACT_F] = (
                    con.r1.x, con.r1.y, con.r2.x, con.r2.y, con.nMass, con.tMass,
                    con.bounce, con.jnAcc, con.jtAcc, con.jBias, con.bias,
                )  # fmt: skip
                # cpHashValue is an unsigned pointer-sized int: keep all 64 bits.
                i[6 + c] = np.uint64(con.hash).astype(np.int64)
        # Sort by shape pair so that the saved state does not depend on hash-set order.
        order = np.lexsort((arb_i[:, 1], arb_i[:, 0]))
        return SpaceState(
            bodies=bodies,
            arbiters_f=arb_f[order],
            arbiters_i=arb_i[order],
            curr_dt=float(lib.cpSpaceGetCurrentTimeStep(self.space._space)),
        )

    # --- restore ------------------------------------------------------------------------
    def load(self, state: SpaceState) -> None:
        """Put ``state`` into the space (between steps only)."""
        cspace = self.space._space
        if lib.cpSpaceIsLocked(cspace):
            raise RuntimeError("cannot load a state into a space that is stepping")
        if state.bodies.shape != (len(self.bodies), BODY_FIELDS):
            raise ValueError(
                f"body state has shape {state.bodies.shape}, expected "
                f"({len(self.bodies)}, {BODY_FIELDS})"
            )
        # Removing the dynamic shapes also drops every cached arbiter (each involves one).
        for shape in self.dynamic_shapes:
            lib.cpSpaceRemoveShape(cspace, shape._shape)
        for row, raw in zip(state.bodies, self._raw):
            vals = row.tolist()
            for j in range(BODY_FIELDS - 3):
                raw[_P + j] = vals[j]
            raw[_V_BIAS], raw[_V_BIAS + 1], raw[_W_BIAS] = vals[BODY_FIELDS - 3 :]
        lib.cpSpaceSetCurrentTimeStep(cspace, state.curr_dt)
        # Same hash ids as when the shapes were first added: contact hashes, which match
        # cached impulses to new contacts, are built from them.
        lib.cpSpaceSetShapeIDCounter(cspace, self.n_static)
        for shape in self.dynamic_shapes:
            lib.cpSpaceAddShape(cspace, shape._shape)
        stamp = int(lib.cpSpaceGetTimestamp(cspace))
        if len(state.arbiters_i) and stamp < state.arbiters_i[:, 4].max():
            # A young space (just built): move its clock forward so ages fit.
            stamp = int(state.arbiters_i[:, 4].max())
            lib.cpSpaceSetTimestamp(cspace, stamp)
        for f, i in zip(state.arbiters_f.tolist(), state.arbiters_i.tolist()):
            self._add_arbiter(f, i, stamp)

    def _add_arbiter(self, f: list[float], i: list[int], stamp: int) -> None:
        arb = lib.cpArbiterNew(self.shapes[i[0]]._shape, self.shapes[i[1]]._shape)
        arb.e, arb.u = f[0], f[1]
        arb.surface_vr = (f[2], f[3])
        arb.n = (f[4], f[5])
        count = i[2]
        contacts = lib.cpContactArrAlloc(_MAX_CONTACTS)
        for c in range(count):
            con = contacts[c]
            o = 6 + c * _CONTACT_F
            con.r1 = (f[o], f[o + 1])
            con.r2 = (f[o + 2], f[o + 3])
            (con.nMass, con.tMass, con.bounce, con.jnAcc, con.jtAcc, con.jBias, con.bias) = f[
                o + 4 : o + _CONTACT_F
            ]
            con.hash = i[6 + c] & 0xFFFFFFFFFFFFFFFF
        arb.count = count
        arb.contacts = contacts
        arb.swapped = bool(i[3])
        arb.stamp = stamp - i[4]
        arb.state = i[5]
        lib.cpSpaceAddCachedArbiter(self.space._space, arb)
