"""A run calibrated on its validation split and frozen: export's second and third stages.

`calibrate_run` fits the temperature under calibration.py's rule and chooses the
decision rule, writing RUN/calibration/ (calibration.json, decision.json,
reliability.png); `freeze` writes RUN/frozen.pb, the eval graph with 1/T folded into
the final convolution when the temperature is applied.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellwatch.shared.manifest import Calibration, Decision
from cellwatch.training import LABELS, plots
from cellwatch.training.calibration import calibrate, choose_decision, reliability, softmax
from cellwatch.training.evalgraph import EvalGraph
from cellwatch.training.evaluate import predict_logits
from cellwatch.training.outdir import staged_dir
from cellwatch.training.runinfo import FROZEN_FILE, RunInfo, write_json
from cellwatch.training.split import SplitFile

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
CALIBRATION_FILE = "calibration.json"


def calibrate_run(
    run: Path,
    info: RunInfo,
    split: SplitFile,
    *,
    target_sensitivity: float,
    band_half_width: float,
    threshold: float | None,
) -> tuple[Calibration, Decision, np.ndarray]:
    """Temperature, decision rule and calibrated validation probabilities; RUN/calibration/."""
    val = split.entries("val")
    y = np.array([e.label for e in val], np.int64)
    logits = (
        predict_logits(run, info, val, "validation logits")
        if val
        else np.zeros((0, len(LABELS)), np.float32)
    )
    calibration = calibrate(logits, y)
    if calibration.note:
        log.warning("calibration: %s", calibration.note)
    scale = 1.0 / calibration.temperature if calibration.applied else 1.0
    probs = softmax(logits * scale) if len(val) else np.zeros((0, len(LABELS)))
    decision = choose_decision(
        probs[:, 1],
        y,
        positive_label=LABELS[1],
        target_sensitivity=target_sensitivity,
        half_width=band_half_width,
        threshold=threshold,
    )
    log.info(
        "calibration on %d validation images: T %.3g (%s), ECE %s -> %s; threshold %.3f, "
        "low-confidence band [%.3f, %.3f]",
        len(val),
        calibration.temperature,
        "applied" if calibration.applied else "NOT applied",
        _num(calibration.ece_before),
        _num(calibration.ece_after),
        decision.threshold,
        *decision.low_confidence,
    )
    out = run / CALIBRATION_DIR
    with staged_dir(out, marker=CALIBRATION_FILE, force=True, what="calibration") as tmp:
        write_json(tmp / CALIBRATION_FILE, calibration)
        (tmp / "decision.json").write_text(decision.model_dump_json(indent=2) + "\n")
        if len(val):
            raw = softmax(logits)[:, 1]
            plots.reliability(
                reliability(raw, y),
                reliability(softmax(logits / calibration.temperature)[:, 1], y),
                tmp / "reliability.png",
                title=f"validation split, n={len(val)}",
                synthetic=info.synthetic,
                after_label=f"T={calibration.temperature:.3g}"
                + ("" if calibration.applied else " (worse: NOT applied)"),
            )
    return calibration, decision, probs


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def freeze(run: Path, info: RunInfo, calibration: Calibration) -> Path:
    """RUN/frozen.pb: the eval graph with the temperature folded in (byte-reproducible)."""
    with EvalGraph(
        run / info.checkpoint, batch=1, depth_multiplier=info.config.depth_multiplier
    ) as graph:
        if calibration.applied:
            graph.scale_logits(1.0 / calibration.temperature)
        graph_def = graph.freeze()
    path = run / FROZEN_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(graph_def.SerializeToString(deterministic=True))  # reproducible bytes
    tmp.replace(path)
    log.info("froze %s into %s (%d nodes)", info.checkpoint, path, len(graph_def.node))
    return path
