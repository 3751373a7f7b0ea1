"""Search over world models (MCTS, CEM/MPPI): pure functions over arrays, backend-agnostic."""
