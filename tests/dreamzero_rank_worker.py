"""One rank of the two-rank DreamZero test (run by tests/test_dreamzero_ranks.py).

    python tests/dreamzero_rank_worker.py RANK PORT OUT_DIR

Both ranks: DreamZero's head split over two CPU processes with gloo (rank 0 the
conditional branch and kv_cache1, rank 1 the negative one and kv_cache_neg), started and
stepped; the state gathered on rank 0 and saved as one safetensors snapshot; two more
steps; then the saved snapshot scattered back to both ranks and the same two steps again.
Rank 0 writes what it saw to OUT_DIR for the test to compare with a single process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from arcfab_gym.fabric.snapshot import WorldStateSnapshot
from arcfab_gym.models.dreamzero import ranks
from arcfab_gym.models.dreamzero.backend import DreamZero


def main() -> None:
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = DreamZero(num_inference_steps=4)
        m.parallelize()  # the default group: both processes
        acts = np.random.default_rng(0).uniform(-1, 1, size=(4, m.action_dim)).astype(np.float32)
        m.start(m.prompts[0], seed=0)
        for a in acts[:2]:
            m.step(a)
        state = ranks.gather_state(m)
        later = [m.step(a).observation["action_chunk"].tolist() for a in acts[2:]]
        # A seed set on one rank only: the ranks now disagree, so nothing is gathered.
        m.set_seed(123 if rank == 1 else 0)
        try:
            ranks.gather_state(m)
            mismatch = "not detected"
        except ranks.RankMismatchError as exc:
            mismatch = str(exc)
        # A state missing rank 1's share is refused on both ranks.
        try:
            half = None
            if rank == 0:
                half = m.extract_state()  # rank 0's share only
            ranks.scatter_state(m, half)
            refused = "not refused"
        except ranks.RankMismatchError as exc:
            refused = str(exc)
        loaded = None
        if rank == 0:
            snap = WorldStateSnapshot(
                tensors=state.tensors,
                meta=state.meta,
                backend=m.name,
                backend_config=m.config(),
                frame_index=m.frame_count - 1,
                prompt=state.meta["prompt"],
                seed=state.meta["seed"],
            )
            path = snap.save(out / "two_ranks.safetensors")
            loaded = WorldStateSnapshot.load(path).model_state
        ranks.scatter_state(m, loaded)
        again = [m.step(a).observation["action_chunk"].tolist() for a in acts[2:]]
        # A seed set through the collective reaches both ranks (and changes the future).
        ranks.scatter_state(m, loaded)
        ranks.set_seed(m, 7 if rank == 0 else 999)
        seeded = [m.step(a).observation["action_chunk"].tolist() for a in acts[2:]]
        seeds = [None, None]
        dist.all_gather_object(seeds, m.seed)
        if rank == 0:
            (out / "rank0.json").write_text(json.dumps({
                "later": later, "again": again, "seeded": seeded, "seeds": seeds,
                "mismatch": mismatch, "refused": refused}))  # fmt: skip
        # Both ranks leave together: a rank that tears gloo down while its peer is still
        # sending aborted now and then ("terminate called without an active exception")
        # on a loaded machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
