"""The layers stay clean: each package imports only what lies below it (read from the
source, so a lazy import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imported_modules(p) for p in (ROOT / folder).rglob("*.py")}


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        # Push-T's facts depend on nothing of this project above them.
        ("arcfab_gym/tasks", ("arcfab_gym.models", "arcfab_gym.fabric", "arcfab_gym.envs",
                              "arcfab_gym.service", "arcfab_gym.scenarios", "planners", "agents")),
        # Planners know nothing of Push-T, of the env, or of any backend.
        ("planners", ("arcfab_gym.tasks", "arcfab_gym.envs", "arcfab_gym.models.pusht_sim",
                      "arcfab_gym.models.mini_dreamzero", "gym_pusht", "gymnasium", "agents")),
        # Backends know nothing of planners, agents or the env.
        ("arcfab_gym/models", ("planners", "agents", "arcfab_gym.envs", "gymnasium")),
    ],
)  # fmt: skip
def test_a_layer_imports_nothing_above_it(folder, forbidden):
    bad = {
        f: sorted(m for m in mods if m.startswith(forbidden))
        for f, mods in imports_of(folder).items()
    }
    assert not {f: m for f, m in bad.items() if m}


def test_the_backend_does_not_import_its_training_code():
    """State layout, normalisation and the flow target live in ``features``, which both
    the backend and training import; the backend never needs training."""
    backend = imported_modules(ROOT / "arcfab_gym/models/mini_dreamzero/backend.py")
    assert "arcfab_gym.models.mini_dreamzero.training" not in backend
    assert "arcfab_gym.models.mini_dreamzero.features" in backend or any(
        m == "arcfab_gym.models.mini_dreamzero" for m in backend
    )
