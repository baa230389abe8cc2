"""`manifest.metrics`: the figures of the model a bundle actually ships.

    {"split": "test", "n": 32, "split_fingerprint": "<sha>",
     "deployed": {"precision": "int8", "device": "CPU", "inference_precision": "bf16",
                  "machine": "<CPU name>", "metrics": METRICSET},
     "f32": {"metrics": METRICSET},          # the same IR forced to f32 arithmetic
     "tensorflow": {"metrics": METRICSET},   # frozen.pb in TensorFlow, for reference
     "agreement": {"value", "ci95", "k", "n"},   # deployed decisions vs TensorFlow's
     "parity": {"max_abs_diff_f32", "max_abs_diff_deployed"}}

METRICSET is `stats.MetricSet` (each proportion with its Wilson interval and counts,
ROC AUC with a bootstrap interval), all at the bundle's decision threshold.
"deployed" is the IR run by OpenVINO on the export machine's CPU at the device's
default inference precision, which is what a node with the same CPU computes; other
devices may differ slightly (the node's self-test bounds by how much).
"""

from __future__ import annotations

import platform
from pathlib import Path

from pydantic import Field

from cellwatch.shared.base import Strict
from cellwatch.training.ir import Precision
from cellwatch.training.split import SplitName
from cellwatch.training.stats import MetricSet, Proportion


class Deployed(Strict):
    precision: Precision
    device: str
    inference_precision: str
    machine: str = Field(description="the CPU the figures were measured on")
    metrics: MetricSet


class Reference(Strict):
    metrics: MetricSet


class Parity(Strict):
    max_abs_diff_f32: float = Field(ge=0.0, description="max |p_IR(f32) - p_TensorFlow|")
    max_abs_diff_deployed: float = Field(ge=0.0, description="max |p_IR(deployed) - p_TF|")


class BundleMetrics(Strict):
    split: SplitName
    n: int = Field(ge=0)
    split_fingerprint: str
    deployed: Deployed
    f32: Reference
    tensorflow: Reference
    agreement: Proportion
    parity: Parity


def machine_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"
