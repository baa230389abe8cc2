"""The strict pydantic base of every message, API model, manifest and record (and
`Lenient`, for provenance written by other versions and tools).

Unknown fields are errors (a typo in a config or a message from another version is
reported, not ignored), instances are immutable, and fields may be given by name
even when they have a wire alias (`schema_` / `schema`). Models that must refuse
NaN and infinities (telemetry) add `allow_inf_nan=False` to this config.
A ValidationError is reported as `field.path: reason` by `first_problem`.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
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


class Lenient(BaseModel):
    """For what other versions and tools wrote into a signed file (a bundle's provenance):
    every known field is typed and optional, unknown fields are kept as they are, so an
    older bundle still reads and a newer one loses nothing when stored again."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the fields that were given (and the unknown ones): a field an older bundle
        did not carry stays absent when stored again, instead of becoming null."""
        data: dict[str, Any] = handler(self)
        given = set(self.__pydantic_extra__ or {})
        for name in self.model_fields_set:
            info = type(self).model_fields.get(name)
            names = [name] + ([info.serialization_alias, info.alias] if info else [])
            given |= {n for n in names if n is not None}
        return {k: v for k, v in data.items() if k in given}
