"""Things that act: planning agents, recovery agents, stable-baselines3 glue."""
