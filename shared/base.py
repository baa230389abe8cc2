"""The strict pydantic base of every message, API model, manifest and record (and
`Lenient`, for provenance written by other versions and tools).

Unknown fields are errors (a typo in a config or a message from another version is
reported, not ignored), instances are immutable, and fields may be given by name
even when they have a wire alias (`schema_` / `schema`). Models that must refuse
NaN and infinities (telemetry) add `allow_inf_nan=False` to this config.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
