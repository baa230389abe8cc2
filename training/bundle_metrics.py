"""`manifest.metrics` (types in shared/figures.py) and the machine they were measured on.

The figures of the model a bundle actually ships:

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

from cellwatch.shared.figures import BundleMetrics, Deployed, Parity, Reference, UnitFigures

__all__ = ["BundleMetrics", "Deployed", "Parity", "Reference", "UnitFigures", "machine_name"]


def machine_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"
