"""What a node says about itself: its retained `NodeStatus` (`online` with a fresh
boot_id, `offline` at a stop and in its Will) and its periodic `Telemetry`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from importlib import metadata

import openvino as ov

from cellwatch.node.config import NodeSettings
from cellwatch.node.drift import DriftMonitor
from cellwatch.node.engine import available_devices
from cellwatch.node.slot import ModelSlot
from cellwatch.node.stats import Stats
from cellwatch.shared.schemas import NodeStatus, SampleFigures, Telemetry, utcnow
from cellwatch.shared.states import NodeState


def software_versions() -> dict[str, str]:
    versions = {}
    for dist in ("cellwatch", "openvino", "paho-mqtt", "opencv-python-headless"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Reporter:
    def __init__(
        self,
        settings: NodeSettings,
        *,
        boot_id: str,
        started_at: datetime,
        core: ov.Core,
        slot: ModelSlot,
        stats: Stats,
        drift: DriftMonitor | None = None,
        samples: Callable[[], SampleFigures] | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.boot_id = boot_id
        self.started_at = started_at
        self.core = core
        self.slot = slot
        self.stats = stats
        self.drift = drift
        self.samples = samples
        self._software = software_versions()

    def status(self, online: bool) -> NodeStatus:
        model = self.slot.current()
        return NodeStatus(
            node_id=self.node_id,
            state=NodeState.ONLINE if online else NodeState.OFFLINE,
            boot_id=self.boot_id,
            since=self.started_at,
            model=model.bundle.ref if model is not None else None,
            model_error=self.slot.error,
            device=self.settings.inference.device,
            devices_available=available_devices(self.core),
            tags=list(self.settings.tags),
            software=self._software,
            model_flags=model.flags if model is not None else [],
            site=self.settings.site,
        )

    def telemetry(self) -> Telemetry:
        processed, errors, inflight, ips, latency = self.stats.snapshot()
        model = self.slot.current()
        return Telemetry(
            node_id=self.node_id,
            ts=utcnow(),
            window_s=self.stats.window_s,
            processed=processed,
            errors=errors,
            errors_by_code=self.stats.errors_by_code(),
            throughput_ips=round(ips, 3),
            latency_ms=latency,
            inflight=max(0, inflight),
            model_version=model.bundle.manifest.version if model is not None else None,
            rss_mb=round(self.stats.rss_mb(), 1),
            drift=self.drift.figures() if self.drift is not None else None,
            retained_images=self.stats.retained_images,
            samples=self.samples() if self.samples is not None else None,
        )
