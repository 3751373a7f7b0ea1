"""Runnable experiments (Hydra apps): ``python -m experiments.<name>``."""
