"""The node's shadow scorer and drift monitor, in-process on the toy model (issue 19):
what a window holds, the skip rule, and each drift signal's state."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from cellwatch.node.drift import DriftMonitor, compare, state_of
from cellwatch.node.engine import ServingModel
from cellwatch.node.shadow import ShadowRefused, ShadowScorer, check_beside
from cellwatch.shared.bundle import load_bundle
from cellwatch.shared.codes import UpdateErrorCode
from cellwatch.shared.drift import DriftSignal
from cellwatch.shared.schemas import ShadowOrder, ShadowReport, utcnow
from cellwatch.shared.signing import TrustedKeys
from cellwatch.shared.states import DriftState, ShadowState
from cellwatch.shared.topics import Topics
from tests.edge import Recorder
from tests.helpers.shadow import observation, reference, serving, smears
from tests.models import write_test_bundle

T = Topics()


class Models:
    def __init__(self, root: Path) -> None:
        keys = root / "keys"
        self.keys = keys
        self.active = serving(write_test_bundle(root / "v1", keys), keys)
        self.agreeing = serving(write_test_bundle(root / "v2", keys, version="2.0.0"), keys)
        swapped = write_test_bundle(root / "swap", keys, version="9.0.0", swap_labels=True)
        self.swapped = serving(swapped, keys)
        self.root = root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("shadow-models"))


@pytest.fixture(scope="module")
def with_reference(models: Models) -> ServingModel:
    """The toy with a drift reference of 100 smears (export's validation split)."""
    ref = reference(models.active, smears(100, seed=11))
    bundle = write_test_bundle(models.root / "ref", models.keys, version="4.0.0", reference=ref)
    return serving(bundle, models.keys)


def order(model: ServingModel, rate: float = 1.0) -> ShadowOrder:
    return ShadowOrder(rollout_id="r7", model=model.bundle.ref, rate=rate, issued_at=utcnow())


def scorer(recorder: Recorder, max_live: int = 0, seed: int = 1) -> ShadowScorer:
    return ShadowScorer(
        node_id="node-t",
        boot_id="b" * 32,
        publisher=recorder,
        topics=T,
        window_s=3600.0,
        max_live=max_live,
        rng=random.Random(seed),
    )


def reports(recorder: Recorder) -> list[ShadowReport]:
    return [
        ShadowReport.model_validate_json(p.payload) for p in recorder.on(T.shadow_report("node-t"))
    ]


def test_an_agreeing_candidate_scores_every_image_into_one_window(models: Models) -> None:
    rec = Recorder()
    s = scorer(rec)
    s.start(order(models.agreeing), models.agreeing)
    for i, payload in enumerate(smears(12, seed=4)):
        s.observe(observation(models.active, payload, i), lambda: 0)
    s.flush(force=True)
    s.flush(force=True)  # nothing new: no second window
    sent = reports(rec)
    assert [r.state for r in sent] == [ShadowState.SHADOWING, ShadowState.SHADOWING]
    w = sent[1].window
    assert w is not None and sent[0].window is None
    assert (w.n, w.agreements, w.skipped) == (12, 12, 0)
    assert sum(sum(row.values()) for row in w.confusion.values()) == 12
    assert w.disagreements == [] and w.max_abs_dp is not None and w.max_abs_dp < 0.5
    assert w.active_ms is not None and w.candidate_ms is not None
    assert w.window_id == f"{'b' * 32}-1" and sent[1].model == models.agreeing.bundle.ref


def test_a_disagreeing_candidate_names_each_image_by_hash_never_by_pixels(
    models: Models,
) -> None:
    rec = Recorder()
    s = scorer(rec)
    s.start(order(models.swapped), models.swapped)
    payloads = smears(6, seed=5)
    for i, payload in enumerate(payloads):
        s.observe(observation(models.active, payload, i), lambda: 0)
    s.stop("test")
    sent = reports(rec)
    assert [r.state for r in sent] == [
        ShadowState.SHADOWING,
        ShadowState.SHADOWING,
        ShadowState.STOPPED,
    ]
    w = sent[1].window
    assert w is not None and (w.n, w.agreements) == (6, 0)
    assert all(a != c for a, row in w.confusion.items() for c in row)  # off the diagonal
    assert {d.image_sha256 for d in w.disagreements} == {
        hashlib.sha256(p).hexdigest() for p in payloads
    }
    text = sent[1].to_json().decode()
    assert "img-" not in text  # image ids (a lab may name files after patients): never sent
    for d in w.disagreements:
        assert d.source == "client" and d.active_label != d.candidate_label
        assert d.candidate["ALL"] == pytest.approx(d.active["normal"], abs=1e-4)  # swapped
    assert w.max_abs_dp is not None and w.max_abs_dp > 0.5


def test_a_busy_node_skips_and_counts_instead_of_scoring(models: Models) -> None:
    rec = Recorder()
    s = scorer(rec, max_live=1)
    s.start(order(models.agreeing), models.agreeing)
    payloads = smears(8, seed=6)
    for i, payload in enumerate(payloads):
        # every other image: 2 live images wait for their Result (> max_live 1)
        s.observe(observation(models.active, payload, i), (lambda: 2) if i % 2 else (lambda: 1))
    s.missed(observation(models.active, payloads[0], 99))  # the observer queue was full
    s.flush(force=True)
    w = reports(rec)[-1].window
    assert w is not None and (w.n, w.skipped) == (4, 5)


def test_a_live_image_arriving_while_the_candidate_runs_cancels_it(models: Models) -> None:
    """No live image waits when the scorer looks, one arrives once the candidate has
    started: the candidate's inference is cancelled, and the image counted skipped."""
    rec = Recorder()
    s = scorer(rec)
    s.start(order(models.agreeing), models.agreeing)
    asked = 0

    def waiting() -> int:  # 0 at the scorer's look, then a live image waits
        nonlocal asked
        asked += 1
        return 0 if asked == 1 else 1

    s.observe(observation(models.active, smears(1, seed=8)[0]), waiting)
    s.observe(observation(models.active, smears(1, seed=9)[0]), lambda: 0)  # scored
    s.flush(force=True)
    w = reports(rec)[-1].window
    assert w is not None and (w.n, w.skipped) == (1, 1)
    assert asked == 2  # asked again while the candidate ran
    again = models.agreeing.infer(observation(models.active, smears(1, seed=8)[0]).pixels)
    assert again.shape == (2,)  # the cancelled request serves the next inference


def test_the_rate_is_a_share_of_the_images(models: Models) -> None:
    rec = Recorder()
    s = scorer(rec, seed=3)
    s.start(order(models.agreeing, rate=0.25), models.agreeing)
    obs = observation(models.active, smears(1, seed=7)[0])
    for _ in range(200):
        s.observe(obs, lambda: 0)
    s.flush(force=True)
    w = reports(rec)[-1].window
    assert w is not None and 30 <= w.n <= 70  # binomial(200, 0.25): 50 +- 4 sd


def test_a_candidate_of_other_labels_cannot_be_scored_beside(models: Models) -> None:
    keys = models.keys
    other = write_test_bundle(models.root / "other", keys, version="3.0.0")
    m = load_bundle(other, TrustedKeys.load(keys)).manifest
    assert m.labels == ["normal", "ALL"]
    bundle = load_bundle(models.root / "v2", TrustedKeys.load(keys))
    check_beside(bundle, models.active, min_free_mb=0)  # compatible, memory enough
    with pytest.raises(ShadowRefused) as refused:
        check_beside(bundle, models.active, min_free_mb=10**9)
    assert refused.value.code is UpdateErrorCode.INSUFFICIENT_MEMORY
    assert "serving model is untouched" in str(refused.value)


# -- drift ---------------------------------------------------------------------------


def test_psi_and_the_chi_square_test_must_both_say_it_moved() -> None:
    same = compare([50, 50], [250, 250])
    assert same[0] == pytest.approx(0.0, abs=1e-3) and same[1] > 0.9
    assert state_of(*same) is DriftState.OK
    moved = compare([50, 50], [450, 50])
    assert moved[0] > 0.25 and moved[1] < 0.01 and state_of(*moved) is DriftState.ALERT
    # a big shift seen on 8 images is not yet evidence (PSI high, p-value not small)
    few = compare([4, 4], [7, 1])
    assert few[0] > 0.25 and few[1] > 0.01 and state_of(*few) is not DriftState.ALERT


def test_drift_moves_from_ok_to_alert_on_shifted_smears(with_reference: ServingModel) -> None:
    model = with_reference
    monitor = DriftMonitor(window=40, min_images=20)
    live = smears(40, seed=12)
    for i, payload in enumerate(live[:10]):
        monitor.observe(observation(model, payload, i), lambda: 0)
    f = monitor.figures()
    assert f is not None and f.state is DriftState.COLLECTING and f.n == 10
    for i, payload in enumerate(live[10:]):
        monitor.observe(observation(model, payload, i), lambda: 0)
    f = monitor.figures()
    assert f is not None
    assert f.state is DriftState.OK, f.signals
    assert f.reference_n == 100 and set(f.signals) == set(DriftSignal)
    for i, payload in enumerate(smears(40, seed=13, shift="blur")):
        monitor.observe(observation(model, payload, i), lambda: 0)
    f = monitor.figures()
    assert f is not None and f.state is DriftState.ALERT
    assert f.signals[DriftSignal.SHARPNESS].state is DriftState.ALERT
    assert f.accuracy is not None and not f.accuracy.supported
    assert f.accuracy.note is not None and "no held-out calibration check" in f.accuracy.note
    assert "inputs have drifted (sharpness" in f.accuracy.note
    assert sum(f.total_labels.values()) == 80 and f.dropped == 0


def test_another_stain_moves_the_colour(with_reference: ServingModel) -> None:
    monitor = DriftMonitor(window=40, min_images=20)
    for i, payload in enumerate(smears(40, seed=14, shift="stain")):
        monitor.observe(observation(with_reference, payload, i), lambda: 0)
    f = monitor.figures()
    assert f is not None and f.signals[DriftSignal.COLOR].state is DriftState.ALERT


def test_a_bundle_without_a_reference_says_so_and_never_alerts(models: Models) -> None:
    monitor = DriftMonitor(window=20, min_images=5)
    for i, payload in enumerate(smears(20, seed=15, shift="blur")):
        monitor.observe(observation(models.active, payload, i), lambda: 0)
    f = monitor.figures()
    assert f is not None and f.state is DriftState.NO_REFERENCE and f.signals == {}
    assert f.reference_n is None and sum(f.labels.values()) == 20
    assert np.sum(f.confidence) == 20


def test_without_a_candidate_nothing_is_scored_or_sent(models: Models) -> None:
    rec = Recorder()
    s = scorer(rec)
    assert s.current() is None
    s.observe(observation(models.active, smears(1, seed=2)[0]), lambda: 0)
    s.flush(force=True)
    assert rec.published == [] and s.scored == s.skipped == 0
