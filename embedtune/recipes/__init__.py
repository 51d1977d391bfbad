"""Shipped training recipes (YAML files in this folder): ``embedtune ls`` lists them, ``embedtune cp``
copies one, and ``embedtune train NAME`` runs one by name."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["RECIPE_DIR", "list_recipes", "recipe_path"]

RECIPE_DIR = Path(__file__).resolve().parent


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description (the YAML's first comment line)."""
    out: dict[str, str] = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return out


def recipe_path(name: str) -> Path | None:
    """The path of a shipped recipe by name (with or without ``.yaml``), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = RECIPE_DIR / f"{stem}.yaml"
    return path if path.is_file() and "/" not in stem else None


def load_recipe_dict(name: str) -> dict:
    """The raw mapping of a shipped recipe."""
    path = recipe_path(name)
    if path is None:
        raise KeyError(name)
    return yaml.safe_load(path.read_text(encoding="utf-8"))
