from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.schemas import (
    DesiredModel,
    FetchRequest,
    ModelRef,
    NodeStatus,
    Result,
    Telemetry,
    UpdateReport,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SHA = "a" * 64


def test_result_round_trip_uses_schema_tag() -> None:
    r = Result(
        status="ok",
        image_id="img-1",
        source="scope",
        node_id="node-1",
        model=ModelRef(name="m", version="1.0", manifest_sha256=SHA),
        label="ALL",
        class_index=1,
        confidence=0.9,
        probabilities={"normal": 0.1, "ALL": 0.9},
        low_confidence=False,
        received_at=NOW,
        completed_at=NOW,
    )
    data = json.loads(r.to_json())
    assert data["schema"] == "cellwatch.result/1"
    assert Result.model_validate(data) == r


def test_messages_forbid_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        FetchRequest.model_validate(
            {
                "node_id": "n",
                "manifest_sha256": SHA,
                "file": "model.bin",
                "offset": 0,
                "length": 1,
                "extra": 1,
            }
        )


def test_error_codes_are_the_designed_ones() -> None:
    assert {c.value for c in ErrorCode} >= {
        "undecodable_image",
        "unsupported_format",
        "image_too_large",
        "payload_too_large",
        "expired",
        "no_model",
        "internal",
    }


def test_other_messages_validate() -> None:
    NodeStatus(node_id="n", state="online", boot_id="b" * 16, since=NOW)
    Telemetry.model_validate_json(
        Telemetry(
            node_id="n",
            ts=NOW,
            window_s=10,
            processed=1,
            errors=0,
            throughput_ips=0.1,
            latency_ms={"p50": 1, "p95": 2, "p99": 3},
            inflight=0,
            rss_mb=10,
        ).to_json()
    )
    d = DesiredModel(
        rollout_id="r1", model={"name": "m", "version": "1", "manifest_sha256": SHA}, issued_at=NOW
    )
    assert DesiredModel.model_validate_json(d.to_json()) == d
    UpdateReport(rollout_id="r1", model=d.model, state="active", progress=1.0, ts=NOW)
    with pytest.raises(ValidationError):
        UpdateReport(rollout_id="r1", model=d.model, state="bogus", progress=1.0, ts=NOW)
    with pytest.raises(ValidationError):
        FetchRequest(manifest_sha256=SHA, file="model.bin", offset=-1, length=1)
    f = FetchRequest(manifest_sha256=SHA, file="model.bin", offset=0, length=1)
    assert json.loads(f.to_json())["schema"] == "cellwatch.fetch/2"
    with pytest.raises(ValidationError):  # the topic names the node, never the body
        FetchRequest.model_validate_json(f.to_json().replace(b"{", b'{"node_id":"n",', 1))
