"""`export`: the manifest states the shipped model's own figures (with intervals), the gate
refuses a model whose decisions moved, and the bundle is complete, signed and traceable.
Bad requests are refused without touching anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellwatch.shared.bundle import load_bundle, sha256_file
from cellwatch.shared.drift import CONFIDENCE_CUTS, histogram, input_statistics
from cellwatch.shared.errors import SignatureError
from cellwatch.shared.manifest import Manifest
from cellwatch.shared.signing import TrustedKeys, key_id, load_private_key
from cellwatch.training.calibration import softmax
from cellwatch.training.errors import ExportError, GateError, TrainingError
from cellwatch.training.evalgraph import EvalGraph, FrozenGraph
from cellwatch.training.evaluate import batches
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.ir import DEVICE_DEFAULT, CompiledIR, Precision
from cellwatch.training.packaging import GOLDEN_TOLERANCE
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.runinfo import FROZEN_FILE, load_run
from cellwatch.training.split import load_split
from cellwatch.training.stats import MetricSet, metric_set
from cellwatch.training.tfcompat import tf1
from tests.training.runs import Bundles, gate_threshold, inputs_of
from tests.training.sizes import TEST_BASE, TEST_DEPTH

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out(trained_run: Path) -> tuple[np.ndarray, np.ndarray]:
    return inputs_of(trained_run)


def trusted(key: Path) -> TrustedKeys:
    public = load_private_key(key).public_key()
    return TrustedKeys({key_id(public): public})


def manifest_of(path: Path) -> Manifest:
    return load_bundle(path, TrustedKeys({}), allow_unsigned=True).manifest


def test_frozen_graph_is_the_contract(trained_run: Path, bundle: Bundles) -> None:
    bundle("fp32")
    graph_def = tf1.GraphDef()
    graph_def.ParseFromString((trained_run / FROZEN_FILE).read_bytes())
    nodes = {n.name: n for n in graph_def.node}
    assert nodes["input"].op == "Placeholder"
    dims = [d.size for d in nodes["input"].attr["shape"].shape.dim]
    assert dims == [1, 299, 299, 3]
    assert nodes["probabilities"].op == "Identity"
    assert not [n for n in graph_def.node if "Variable" in n.op]
    assert not [n for n in nodes if n.startswith("InceptionV3/AuxLogits")]


def test_calibration_is_folded_into_the_shipped_logits(
    trained_run: Path, bundle: Bundles, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    m = manifest_of(bundle("fp32"))
    assert m.calibration is not None and m.calibration.n == 6
    x, _ = held_out
    with EvalGraph(
        trained_run / load_run(trained_run).checkpoint, depth_multiplier=TEST_DEPTH
    ) as graph:
        logits = graph.predict_logits(x)
    scale = 1 / m.calibration.temperature if m.calibration.applied else 1.0
    with FrozenGraph(trained_run / FROZEN_FILE) as frozen:
        np.testing.assert_allclose(frozen.predict(x), softmax(logits * scale), atol=1e-5)
    assert (trained_run / "calibration" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_fp32_ir_matches_frozen_pb(
    trained_run: Path, bundle: Bundles, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    ir = CompiledIR(bundle("fp32") / "model.xml")  # f32 inference precision
    x, _ = held_out
    with FrozenGraph(trained_run / FROZEN_FILE) as frozen:
        assert np.abs(ir.predict(x) - frozen.predict(x)).max() <= 1e-4
    assert ir.input_name == "input" and ir.output_name == "probabilities"


def same_figures(ours: MetricSet, stated: dict[str, object]) -> None:
    theirs = MetricSet.model_validate(stated)
    assert theirs.confusion == ours.confusion and theirs.n == ours.n
    for name in ("accuracy", "sensitivity", "specificity", "precision", "npv", "roc_auc"):
        assert getattr(theirs, name) == getattr(ours, name), name


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_manifest_states_the_shipped_models_own_figures(
    precision: Precision,
    trained_run: Path,
    bundle: Bundles,
    held_out: tuple[np.ndarray, np.ndarray],
    split_dir: Path,
) -> None:
    path = bundle(precision)
    m = manifest_of(path)
    assert m.decision is not None
    t = m.decision.threshold
    x, y = held_out
    deployed = CompiledIR(path / "model.xml", DEVICE_DEFAULT)
    p_dep = deployed.predict(x)
    p_f32 = CompiledIR(path / "model.xml").predict(x)
    with FrozenGraph(trained_run / FROZEN_FILE) as frozen:
        p_tf = frozen.predict(x)
    stated = m.figures
    assert stated is not None
    assert stated.split == "test" and stated.n == len(y) == 6
    assert stated.split_fingerprint == load_split(split_dir).fingerprints["test"]
    dep = stated.deployed
    assert dep.precision == precision and dep.device == "CPU"
    assert dep.inference_precision == deployed.inference_precision
    same_figures(metric_set(y, p_dep[:, 1], t), dep.metrics.model_dump(mode="json"))
    same_figures(metric_set(y, p_f32[:, 1], t), stated.f32.metrics.model_dump(mode="json"))
    same_figures(metric_set(y, p_tf[:, 1], t), stated.tensorflow.metrics.model_dump(mode="json"))
    agree = int(np.sum((p_dep[:, 1] >= t) == (p_tf[:, 1] >= t)))
    assert stated.agreement.k == agree and stated.agreement.n == 6
    assert stated.agreement.ci95 is not None
    lo, hi = stated.agreement.ci95
    assert lo <= agree / 6 <= hi
    sens = dep.metrics.sensitivity
    assert sens.n == int(y.sum()) and sens.ci95 is not None and sens.value is not None
    assert sens.ci95[0] <= sens.value <= sens.ci95[1]
    print(f"{precision}: agreement {agree}/6, deployed confusion {dep.metrics.confusion}")

    # the gate's agreement is over every image of train, val and test (issue 18, 2)
    every = stated.agreement_all
    assert every is not None and every.n == 40
    gate = m.provenance.gate
    assert gate is not None and gate.agreement_n == 40
    assert gate.agreement == pytest.approx(every.k / every.n)
    assert gate.max_prob_diff == pytest.approx(stated.parity.max_abs_diff_deployed)
    assert gate.max_prob_diff_limit == 0.1  # gated for every precision
    should_pass = not gate.failures()
    assert gate.passed is should_pass
    assert ("degraded" in m.flags) is (not should_pass)
    assert gate.overridden is (not should_pass)  # int8 is exported with allow_degraded
    if precision == "int8":
        q = m.provenance.quantization
        assert q is not None
        assert q.attempts[0].method.startswith("post-training")


def test_bundle_is_complete_signed_and_traceable(
    bundle: Bundles, signing_key: Path, imagenet_ckpt: Path, split_dir: Path, trained_run: Path
) -> None:
    path = bundle("fp32")
    verified = load_bundle(path, trusted(signing_key))
    m = verified.manifest
    assert sorted(p.name for p in path.iterdir()) == [
        "MODEL_CARD.md",
        "golden.npz",
        "manifest.json",
        "manifest.sig",
        "model.bin",
        "model.xml",
    ]
    assert m.labels == ["normal", "ALL"] and m.output == "probabilities"
    assert m.input.name == "input" and m.input.shape == (1, 299, 299, 3)
    assert m.golden is not None and m.golden.tolerance == GOLDEN_TOLERANCE["fp32"]
    split = load_split(split_dir)
    prov = m.provenance
    assert prov.synthetic is True
    assert m.flags[:3] == ["synthetic", "unverified-base", "no-skill"]
    assert prov.quality is not None and prov.quality.passed is False and prov.quality.overridden
    assert prov.base_checkpoint == str(imagenet_ckpt.resolve())
    assert prov.base_checkpoint_sha256 == sha256_file(imagenet_ckpt)
    assert prov.base_verified is False and prov.base_claim == TEST_BASE
    assert prov.depth_multiplier == TEST_DEPTH
    assert prov.data_fingerprint == split.fingerprints["all"]
    assert prov.frozen_pb_sha256 == sha256_file(trained_run / FROZEN_FILE)
    assert prov.steps == 8 and prov.seed == 5 and prov.selected_epoch in (1, 2)
    assert prov.split_seed == 3 and prov.val_fraction == 0.15 and prov.test_fraction == 0.15
    assert prov.code_commit and len(prov.code_commit.split("+")[0]) == 40
    assert prov.gate is not None and prov.gate.passed is (not prov.gate.failures())
    assert ("degraded" in m.flags) is (not prov.gate.passed)
    assert prov.test_reads is not None and prov.test_reads >= 1
    assert {"tensorflow", "tf-slim", "openvino"} <= set(prov.training_versions or {})

    card = (path / "MODEL_CARD.md").read_text()
    for fragment in (
        "not for diagnosis",
        split.fingerprints["all"],
        "| train | 28 | 14 | 14 |",
        "95% CI",
        "deployed",
        "Temperature scaling" if m.calibration and m.calibration.applied else "Not calibrated",
        "magnification",
        "stain",
        str(imagenet_ckpt.resolve()),
        "tensorflow 2.",
        "SYNTHETIC",
        # issue 18, point 8: what a reviewer expects
        "cropped around a single white cell (ALL-IDB2 style",
        "Intended users:",
        "Contraindications (do not use):",
        "PPV and NPV depend on how common ALL is",
        "at the test split's prevalence 50.0%",
        "No external validation",
        "No subgroup results",
        "split seed 3, fractions val 0.15 / test 0.15",
        f"git commit `{prov.code_commit}`",
        "**UNVERIFIED base**",
        "**NO evidence of skill**",
        "Quality floor (evidence of skill)",
    ):
        assert fragment in card, fragment

    with np.load(path / "golden.npz", allow_pickle=False) as golden:
        inputs, expected = golden["inputs"], golden["probabilities"]
    assert inputs.shape == (8, 299, 299, 3) and inputs.dtype == np.float32
    assert expected.shape == (8, 2) and expected.dtype == np.float32
    got = CompiledIR(path / "model.xml").predict(inputs)
    assert np.abs(got - expected).max() <= m.golden.tolerance
    assert m.golden.inputs and "no patient data" in m.golden.inputs
    with Preprocessor() as pre:  # no image of the data set is in the bundle
        data = np.concatenate(list(batches(split.root, split.entries("test"), pre, "t")))
        data = np.concatenate([data, *batches(split.root, split.entries("train"), pre, "t")])
    distance = np.abs(inputs[:, None] - data[None]).max(axis=(2, 3, 4))
    assert distance.min() > 0.1


def test_the_drift_reference_is_the_deployed_ir_on_validation(
    bundle: Bundles, split_dir: Path
) -> None:
    """The manifest's drift reference (issue 19): the IR as shipped, at the CPU's default
    precision as a node runs it, on the validation split; the input figures the node's
    own function gives on the same pixels."""
    m = manifest_of(bundle("fp16"))
    ref, rule = m.reference, m.decision
    assert ref is not None and rule is not None
    split = load_split(split_dir)
    entries = split.entries("val")
    assert ref.split == "val" and ref.n == len(entries) == 6
    with Preprocessor() as pre:
        x = np.concatenate(list(batches(split.root, entries, pre, "val")))
    p = CompiledIR(bundle("fp16") / "model.xml", DEVICE_DEFAULT).predict(x)[:, 1]
    assert ref.confidence.counts == histogram(list(CONFIDENCE_CUTS), p)
    ref_all = int(np.sum(p >= rule.threshold))
    assert ref.labels == {"normal": len(p) - ref_all, "ALL": ref_all}
    lo, hi = rule.low_confidence
    assert ref.low_confidence == int(np.sum((p >= lo) & (p <= hi)))
    stats = np.array([input_statistics(np.rint((xi + 1) * 127.5)) for xi in x])
    for i in range(3):
        assert ref.color[i].counts == histogram(ref.color[i].cuts, stats[:, i])
    assert ref.sharpness.counts == histogram(ref.sharpness.cuts, stats[:, 3])
    assert ref.size.n == 6 and len(ref.size.counts) >= 2


def test_gate_refuses_a_model_whose_decisions_moved(
    trained_run: Path,
    bundle: Bundles,
    signing_key: Path,
    held_out: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    threshold, _ = gate_threshold(trained_run, bundle, held_out[0])
    options = ExportOptions(
        name="gated",
        version="1",
        precision="fp16",
        sign_key=signing_key,
        threshold=threshold,
        base_is=TEST_BASE,
        allow_no_skill=True,
    )
    with pytest.raises(
        GateError, match=r"agreement with TensorFlow 0\.\d+ < --min-agreement 0\.98"
    ):
        export(trained_run, tmp_path / "refused", options)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.iterdir())

    allowed = export(
        trained_run,
        tmp_path / "degraded",
        ExportOptions(**{**options.__dict__, "allow_degraded": True}),
    )
    m = allowed.manifest
    assert m.flags == ["synthetic", "unverified-base", "no-skill", "degraded"]
    gate = m.provenance.gate
    assert gate is not None and gate.passed is False and gate.overridden is True
    assert m.decision is not None and m.decision.threshold == pytest.approx(threshold)
    assert m.decision.target.startswith("fixed threshold")
    assert m.figures is not None and m.figures.agreement.k <= 5
    assert "**DEGRADED**" in (tmp_path / "degraded" / "MODEL_CARD.md").read_text()


def test_existing_bundle_is_refused_unless_forced(
    bundle: Bundles, trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "bundle"
    shutil.copytree(bundle("fp32"), existing)
    before = (existing / "manifest.json").read_bytes()
    options = ExportOptions(
        name="again",
        version="2",
        precision="fp32",
        sign_key=signing_key,
        base_is=TEST_BASE,
        allow_no_skill=True,
        allow_degraded=True,  # as the fixture (conftest.py): bf16 CPUs move a decision
    )
    with pytest.raises(TrainingError, match="already exists"):
        export(trained_run, existing, options)
    assert (existing / "manifest.json").read_bytes() == before
    other = tmp_path / "photos"
    other.mkdir()
    with pytest.raises(TrainingError, match="refusing to replace"):
        export(trained_run, other, ExportOptions(**{**options.__dict__, "force": True}))
    forced = export(trained_run, existing, ExportOptions(**{**options.__dict__, "force": True}))
    assert forced.manifest.name == "again"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_names_keys_and_gate_settings_are_refused(
    trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    good = ExportOptions(
        name="ok", version="1", precision="fp32", sign_key=signing_key, base_is=TEST_BASE
    )
    with pytest.raises(ExportError, match="invalid --name"):
        export(trained_run, out, ExportOptions(**{**good.__dict__, "name": "../evil"}))
    with pytest.raises(SignatureError):
        export(trained_run, out, ExportOptions(**{**good.__dict__, "sign_key": tmp_path / "no"}))
    for field, value, flag in (
        ("min_agreement", 1.5, "--min-agreement"),
        ("min_agreement", -0.1, "--min-agreement"),
        ("max_sensitivity_drop", 2.0, "--max-sensitivity-drop"),
        ("max_prob_diff", -1.0, "--max-prob-diff"),
    ):
        with pytest.raises(ExportError, match=f"{flag} must be between 0 and 1"):
            export(trained_run, out, ExportOptions(**{**good.__dict__, field: value}))
    assert not out.exists()
    reads = json.loads((trained_run / "run.json").read_text())["test_reads"]
    assert all(r["command"] in ("evaluate", "export") for r in reads)
