"""The one strict pydantic base of every message, API model, manifest and record.

Unknown fields are errors (a typo in a config or a message from another version is
reported, not ignored), instances are immutable, and fields may be given by name
even when they have a wire alias (`schema_` / `schema`). Models that must refuse
NaN and infinities (telemetry) add `allow_inf_nan=False` to this config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
