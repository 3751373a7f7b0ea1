"""Simulations per second of the numpy MCTS (``planners.mcts``) against mctx on jax-CPU.

Both search the same random table MDP (256 states, A actions; ``recurrent_fn`` is a few
table lookups) so the search itself is measured. Rounds interleave the two libraries so
that load on this shared machine hits them alike; medians over rounds are reported.
"Cold" is the first search of a configuration: for mctx it includes tracing and
compilation by ``jax.jit``; numpy has no compile step. mctx is optional
(``pip install -e .[parity]``); without it only the numpy numbers are printed.

    python benchmarks/mcts_throughput.py [--rounds 5] [--batch 1 64] [--sims 50 200]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from planners import mcts

NUM_STATES = 256


def make_tables(num_actions: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "next": rng.integers(0, NUM_STATES, (NUM_STATES, num_actions)).astype(np.int32),
        "reward": rng.normal(size=(NUM_STATES, num_actions)).astype(np.float32),
        "discount": np.full((NUM_STATES, num_actions), 0.97, np.float32),
        "logits": rng.normal(size=(NUM_STATES, num_actions)).astype(np.float32),
        "value": rng.normal(size=NUM_STATES).astype(np.float32),
    }


def numpy_search(tables: dict, batch: int, sims: int, kind: str):
    """A closure running one numpy search on fresh root states."""
    t = tables

    def recurrent_fn(params, rng, action, state):
        nxt = t["next"][state, action]
        out = mcts.RecurrentFnOutput(
            reward=t["reward"][state, action],
            discount=t["discount"][state, action],
            prior_logits=t["logits"][nxt],
            value=t["value"][nxt],
        )
        return out, nxt

    policy = mcts.muzero_policy if kind == "muzero" else mcts.gumbel_muzero_policy
    rng = np.random.default_rng(1)

    def run() -> None:
        states = rng.integers(0, NUM_STATES, batch).astype(np.int32)
        root = mcts.RootFnOutput(t["logits"][states], t["value"][states], states)
        policy(None, rng, root, recurrent_fn, sims)

    return run


def mctx_search(tables: dict, batch: int, sims: int, kind: str):
    """A closure running one jitted mctx search (compiled on its first call)."""
    import jax
    import jax.numpy as jnp
    import mctx

    t = {k: jnp.asarray(v) for k, v in tables.items()}

    def recurrent_fn(params, key, action, state):
        nxt = t["next"][state, action]
        out = mctx.RecurrentFnOutput(
            reward=t["reward"][state, action],
            discount=t["discount"][state, action],
            prior_logits=t["logits"][nxt],
            value=t["value"][nxt],
        )
        return out, nxt

    policy = mctx.muzero_policy if kind == "muzero" else mctx.gumbel_muzero_policy

    @jax.jit
    def search(key, states):
        root = mctx.RootFnOutput(
            prior_logits=t["logits"][states], value=t["value"][states], embedding=states
        )
        out = policy(None, key, root, recurrent_fn, sims)
        return out.action, out.action_weights

    rng = np.random.default_rng(1)
    key = [jax.random.PRNGKey(0)]

    def run() -> None:
        key[0], sub = jax.random.split(key[0])
        states = jnp.asarray(rng.integers(0, NUM_STATES, batch).astype(np.int32))
        jax.block_until_ready(search(sub, states))

    return run


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--sims", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--actions", type=int, default=16)
    args = ap.parse_args()

    try:
        import jax
        import mctx

        versions = f"mctx {mctx.__version__}, jax {jax.__version__} ({jax.default_backend()})"
    except ImportError:
        mctx = None
        print("mctx/jax not installed (pip install -e .[parity]): numpy numbers only.\n")
    tables = make_tables(args.actions)
    configs = [(k, b, s) for k in ("gumbel", "muzero") for b in args.batch for s in args.sims]
    print(
        f"A={args.actions}, {NUM_STATES}-state table MDP, {args.rounds} rounds, medians; "
        "sims/s = batch x simulations / seconds per search"
        + (f"; {versions}" if mctx else "")
    )
    head = f"{'policy':<7} {'B':>3} {'sims':>5} {'numpy sims/s':>13}"
    if mctx:
        head += f" {'mctx sims/s':>12} {'np/mctx':>8} {'cold np s':>10} {'cold mctx s':>12}"
        head += f" {'mctx/np cold':>13}"
    else:
        head += f" {'cold np s':>10}"
    print(head)
    for kind, batch, sims in configs:
        run_np = numpy_search(tables, batch, sims, kind)
        cold_np = seconds(run_np)
        if mctx:
            run_mx = mctx_search(tables, batch, sims, kind)
            cold_mx = seconds(run_mx)
        t_np, t_mx = [], []
        for _ in range(args.rounds):
            t_np.append(seconds(run_np))
            if mctx:
                t_mx.append(seconds(run_mx))
        sps_np = batch * sims / statistics.median(t_np)
        line = f"{kind:<7} {batch:>3} {sims:>5} {sps_np:>13,.0f}"
        if mctx:
            sps_mx = batch * sims / statistics.median(t_mx)
            line += f" {sps_mx:>12,.0f} {sps_np / sps_mx:>8.2f} {cold_np:>10.3f} {cold_mx:>12.2f}"
            line += f" {cold_mx / cold_np:>12.0f}x"
        else:
            line += f" {cold_np:>10.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
