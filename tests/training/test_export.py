"""`export`: frozen.pb and the IR agree, the bundle is complete, signed and verifiable,
and bad requests are refused without touching anything."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cellwatch.shared.bundle import load_bundle, sha256_file
from cellwatch.shared.errors import SignatureError
from cellwatch.shared.signing import TrustedKeys, key_id, load_private_key
from cellwatch.training.errors import ExportError, TrainingError
from cellwatch.training.evalgraph import FrozenGraph
from cellwatch.training.evaluate import batches
from cellwatch.training.export import GOLDEN_TOLERANCE, ExportOptions, export
from cellwatch.training.ir import CompiledIR, Precision
from cellwatch.training.preprocess import Preprocessor
from cellwatch.training.runinfo import FROZEN_FILE
from cellwatch.training.split import load_split
from cellwatch.training.tfcompat import tf1

pytestmark = pytest.mark.slow
Bundles = Callable[[Precision], Path]


@pytest.fixture(scope="module")
def eval_set(split_dir: Path) -> np.ndarray:
    """The val and test images, eval-preprocessed: 12 inputs neither fit nor calibration saw."""
    split = load_split(split_dir)
    entries = split.entries("val") + split.entries("test")
    with Preprocessor() as pre:
        return np.concatenate(list(batches(split.root, entries, pre, "eval")))


@pytest.fixture(scope="module")
def reference(trained_run: Path, bundle: Bundles, eval_set: np.ndarray) -> np.ndarray:
    bundle("fp32")  # writes RUN/frozen.pb
    with FrozenGraph(trained_run / FROZEN_FILE) as graph:
        return graph.predict(eval_set)


def trusted(key: Path) -> TrustedKeys:
    public = load_private_key(key).public_key()
    return TrustedKeys({key_id(public): public})


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


def test_fp32_ir_matches_frozen_pb(
    bundle: Bundles, eval_set: np.ndarray, reference: np.ndarray
) -> None:
    ir = CompiledIR(bundle("fp32") / "model.xml")  # f32 inference precision
    probs = ir.predict(eval_set)
    assert np.abs(probs - reference).max() <= 1e-4
    assert ir.input_name == "input" and ir.output_name == "probabilities"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_keeps_top1(
    precision: Precision,
    bundle: Bundles,
    eval_set: np.ndarray,
    reference: np.ndarray,
    record_property: Callable[[str, object], None],
) -> None:
    path = bundle(precision)
    probs = CompiledIR(path / "model.xml").predict(eval_set)
    agreement = float(np.mean(probs.argmax(1) == reference.argmax(1)))
    record_property(f"{precision}_top1_agreement", agreement)
    record_property(f"{precision}_max_abs_diff", float(np.abs(probs - reference).max()))
    print(
        f"{precision}: top-1 agreement {agreement:.3f}, max |dp| "
        f"{np.abs(probs - reference).max():.3g} on {len(eval_set)} images"
    )
    if precision == "fp16":
        assert agreement == 1.0
    else:
        assert agreement >= 0.75  # int8 is reported; a broken quantisation falls to chance
    manifest = load_bundle(path, TrustedKeys({}), allow_unsigned=True).manifest
    assert manifest.precision == precision
    assert manifest.metrics["ir_agreement"]["precision"] == precision


def test_bundle_is_complete_signed_and_traceable(
    bundle: Bundles, signing_key: Path, imagenet_ckpt: Path, split_dir: Path, trained_run: Path
) -> None:
    path = bundle("fp32")
    verified = load_bundle(path, trusted(signing_key))
    m = verified.manifest
    assert sorted(p.name for p in path.iterdir()) == [
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
    assert m.metrics["evaluation"]["fingerprint"] == split.fingerprints["test"]
    prov = m.provenance
    assert prov["synthetic"] is True
    assert prov["base_checkpoint"]["sha256"] == sha256_file(imagenet_ckpt)
    assert prov["data_fingerprint"] == split.fingerprints["all"]
    assert prov["frozen_pb_sha256"] == sha256_file(trained_run / FROZEN_FILE)
    assert prov["steps"] == 8 and prov["seed"] == 5
    assert {"tensorflow", "tf-slim", "openvino"} <= set(prov["training_versions"])

    with np.load(path / "golden.npz", allow_pickle=False) as golden:
        inputs, expected = golden["inputs"], golden["probabilities"]
    assert inputs.shape == (4, 299, 299, 3) and inputs.dtype == np.float32
    assert expected.shape == (4, 2) and expected.dtype == np.float32
    got = CompiledIR(path / "model.xml").predict(inputs)
    assert np.abs(got - expected).max() <= m.golden.tolerance


def test_existing_bundle_is_refused_unless_forced(
    bundle: Bundles, trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "bundle"
    shutil.copytree(bundle("fp32"), existing)
    before = (existing / "manifest.json").read_bytes()
    options = ExportOptions(name="again", version="2", precision="fp32", sign_key=signing_key)
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


def test_bad_names_and_keys_are_refused(
    trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="invalid --name"):
        export(
            trained_run,
            out,
            ExportOptions(name="../evil", version="1", precision="fp32", sign_key=signing_key),
        )
    with pytest.raises(SignatureError):
        export(
            trained_run,
            out,
            ExportOptions(
                name="ok", version="1", precision="fp32", sign_key=tmp_path / "missing.key"
            ),
        )
    assert not out.exists()
