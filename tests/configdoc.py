"""Helpers for the tests that keep the example configs (deploy/*.example.toml)
documenting every setting of the settings models."""

from __future__ import annotations

from pydantic import BaseModel


def leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every leaf field of a settings model."""
    paths = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= leaf_paths(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def toml_paths(data: dict[str, object], prefix: str = "") -> set[str]:
    """Dotted paths of every key set in a parsed TOML document."""
    paths = set()
    for key, value in data.items():
        if isinstance(value, dict):
            paths |= toml_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths
