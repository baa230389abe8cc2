"""A node process under a shadow order and its drift figures (issue 19), with no hub: the
test writes the retained order as the hub would and reads the node's reports and
telemetry on the broker. Under load the node skips shadow work and counts it; its
drift state moves from ok to alert when the images change under it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cellwatch.node.observers import OBSERVATION_QUEUE
from cellwatch.node.store import BundleStore
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.drift import DriftSignal
from cellwatch.shared.schemas import ShadowOrder, ShadowReport, Telemetry, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.states import DriftState, ShadowState
from cellwatch.shared.topics import Topics
from tests.broker import Broker
from tests.harness import Collector, Requester, wait_for
from tests.helpers.shadow import reference, serving, smears
from tests.models import write_test_bundle
from tests.security.stack import Stack

T = Topics()


@pytest.fixture
def stack(broker: Broker, toy_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", broker, toy_bundle[0], toy_bundle[1])
    s.work.mkdir()
    yield s
    s.stop()


def reports(watch: Collector) -> list[ShadowReport]:
    return [
        ShadowReport.model_validate_json(m.payload) for m in watch.on(T.shadow_report("node-1"))
    ]


def test_a_loaded_node_skips_shadow_work_and_counts_every_image(
    stack: Stack,
    broker: Broker,
    toy_bundle: tuple[Path, Path],
    requester: Requester,
    tmp_path: Path,
) -> None:
    keys = toy_bundle[1]
    candidate = write_test_bundle(tmp_path / "v2", keys, version="2.0.0")
    ref = load_bundle(candidate, TrustedKeys.load(keys)).ref
    store = tmp_path / "store"
    kept = BundleStore(store)  # as a node that loaded it before: no hub to fetch from here
    kept.import_dir(ref.manifest_sha256, candidate)
    kept.pin_shadow(ref.manifest_sha256)
    node = stack.node("node-1", store, extra="[shadow]\nwindow_s = 0.2\n")
    watch = Collector(broker.settings("hub"), T.shadow_report("node-1"), T.status("node-1"))
    try:
        node.start()
        wait_for(lambda: bool(watch.on(T.status("node-1"))), 60, "node-1 online")
        hub = broker.connect("hub")
        order = ShadowOrder(rollout_id="r1", model=ref, rate=1.0, issued_at=utcnow())
        assert hub.publish_wait(T.shadow("node-1"), order.to_json(), retain=True)
        wait_for(
            lambda: any(r.state is ShadowState.SHADOWING for r in reports(watch)), 60, "shadowing"
        )
        payloads = smears(8, seed=31)
        # all in flight at once, fewer than the observers' queue holds: none is missed
        # there, so every skip is the scorer's rule (live images were waiting)
        count = OBSERVATION_QUEUE - 4
        sent = [requester.send(payloads[i % 8], image_id=f"i{i}") for i in range(count)]
        results = [requester.result(s, 60) for s in sent]
        assert {(r.status, r.model.version if r.model else None) for r in results} == {
            ("ok", "1.0.0")
        }

        def counted() -> tuple[int, int]:
            windows = [r.window for r in reports(watch) if r.window is not None]
            return sum(w.n for w in windows), sum(w.skipped for w in windows)

        wait_for(lambda: sum(counted()) == count, 30, "every image scored or skipped")
        scored, skipped = counted()
        assert skipped > 0, "a node with images waiting for their Result skips shadow work"
        print(f"under load: {scored} scored, {skipped} skipped of {count}")
        ids = [r.window.window_id for r in reports(watch) if r.window is not None]
        assert len(ids) == len(set(ids))
    finally:
        watch.close()


def test_drift_moves_from_ok_to_alert_when_the_images_blur(
    stack: Stack,
    broker: Broker,
    toy_bundle: tuple[Path, Path],
    requester: Requester,
    tmp_path: Path,
) -> None:
    bundle, keys = toy_bundle
    ref = reference(serving(bundle, keys), smears(100, seed=11))
    with_ref = write_test_bundle(tmp_path / "ref", keys, version="1.0.1", reference=ref)
    node = stack.node("node-1", extra="[drift]\nwindow = 40\nmin_images = 20\n", bundle=with_ref)
    watch = Collector(broker.settings("hub"), T.telemetry("node-1"))
    try:
        node.start()

        def last() -> Telemetry | None:
            got = watch.on(T.telemetry("node-1"))
            return Telemetry.model_validate_json(got[-1].payload) if got else None

        def state_after(n_total: int) -> DriftState | None:
            t = last()
            if t is None or t.drift is None or sum(t.drift.total_labels.values()) < n_total:
                return None
            return t.drift.state

        for i, p in enumerate(smears(40, seed=12)):
            requester.request(p, image_id=f"ok{i}")
        wait_for(lambda: state_after(40) is not None, 30, "telemetry after 40 images")
        assert state_after(40) is DriftState.OK
        for i, p in enumerate(smears(40, seed=13, shift="blur")):
            requester.request(p, image_id=f"blur{i}")
        wait_for(lambda: state_after(80) is not None, 30, "telemetry after 80 images")
        t = last()
        assert t is not None and t.drift is not None
        assert t.drift.state is DriftState.ALERT
        assert t.drift.signals[DriftSignal.SHARPNESS].state is DriftState.ALERT
        assert t.drift.reference_n == 100
    finally:
        watch.close()
