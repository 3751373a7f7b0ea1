"""The ``dreamzero`` backend: DreamZero's own policy head behind the WorldModel contract.

``backend`` (the backend), ``runtime`` (finding DreamZero's source, building the head,
passing its CUDA-only spots on a CPU), ``tiny`` (the tiny random model and the 14B shapes),
``ranks`` (snapshots and seeds across the two-rank split). Importing this package imports
nothing of DreamZero; the extra ``pip install -e ".[dreamzero]"`` and DreamZero's source
are needed only to build a backend.
"""
