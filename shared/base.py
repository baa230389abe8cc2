"""The one strict pydantic base of every message, API model, manifest and record.

Unknown fields are errors (a typo in a config or a message from another version is
reported, not ignored), instances are immutable, and fields may be given by name
even when they have a wire alias (`schema_` / `schema`). Models that must refuse
NaN and infinities (telemetry) add `allow_inf_nan=False` to this config.
A ValidationError is reported as `field.path: reason` by `first_problem`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def problem(err: ErrorDetails, top: str = "(top level)") -> str:
    """One pydantic error as `field.path: reason` (`top` names the whole input)."""
    where = ".".join(str(p) for p in err["loc"]) or top
    return f"{where}: {err['msg']}"


def first_problem(exc: ValidationError, top: str = "(top level)") -> str:
    """The first error of a ValidationError as `field.path: reason`: the one formatter
    every boundary (API, fetch, messages, bundles, config files) reports with."""
    return problem(exc.errors()[0], top)
