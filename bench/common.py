"""Helpers the benchmarks share: a real broker, benchmark_app, an Inception V3 bundle.

Benchmarks print figures; they are not tests and assert nothing about time.
"""

from __future__ import annotations

import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.broker import Broker  # noqa: E402  (the test broker: the project's own config)

BIN = Path(sys.executable).parent

__all__ = [
    "BIN",
    "REPO",
    "Broker",
    "benchmark_app",
    "benchmark_app_cpu",
    "cpu_name",
    "inception_bundle",
    "smear_bgr",
    "smear_jpeg",
]


def benchmark_app(
    model_xml: Path, hint: str, seconds: int = 15, device: str = "CPU"
) -> dict[str, float]:
    """Run OpenVINO's benchmark_app; returns {'throughput': FPS, 'median_ms', 'count'}."""
    return _benchmark_app(model_xml, hint, ["-t", str(seconds)], device)[0]


def benchmark_app_cpu(
    model_xml: Path, hint: str, seconds: int = 15, device: str = "CPU"
) -> dict[str, float]:
    """benchmark_app's figures plus 'cpu_ms': its CPU time per inference, without the
    fixed cost of reading and compiling the model (a second, one-inference run's CPU
    time is subtracted)."""
    figures, cpu_long = _benchmark_app(model_xml, hint, ["-t", str(seconds)], device)
    short, cpu_short = _benchmark_app(model_xml, hint, ["-niter", "1"], device)
    figures["cpu_ms"] = (cpu_long - cpu_short) / (figures["count"] - short["count"]) * 1000
    return figures


def _benchmark_app(
    model_xml: Path, hint: str, limit: list[str], device: str
) -> tuple[dict[str, float], float]:
    """(figures, CPU seconds of the benchmark_app process)."""
    exe = shutil.which("benchmark_app", path=str(BIN)) or "benchmark_app"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [exe, "-m", str(model_xml), "-d", device, "-hint", hint, *limit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tput = re.search(r"Throughput:\s+([\d.]+)\s+FPS", out)
    median = re.search(r"Median:\s+([\d.]+)\s+ms", out)
    count = re.search(r"Count:\s+(\d+)\s+iterations", out)
    if tput is None or median is None or count is None:
        raise RuntimeError(f"cannot parse benchmark_app output:\n{out}")
    figures = {
        "throughput": float(tput.group(1)),
        "median_ms": float(median.group(1)),
        "count": float(count.group(1)),
    }
    return figures, cpu


def cpu_name() -> str:
    """The CPU's model name (lscpu's), for figures that name their machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def smear_bgr(seed: int = 0, h: int = 480, w: int = 640) -> np.ndarray:
    """A BGR image with smear-like content (pale background, cells, noise)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (214, 200, 230), dtype=np.uint8)
    scale = min(h, w) / 480
    for _ in range(int(60 * scale * scale)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(14, 24) * scale), (150, 120, 205), -1)
    r = int(60 * scale)
    cv2.circle(img, (w // 2, h // 2), r, (190, 160, 200), -1)
    cv2.circle(img, (w // 2, h // 2), r * 3 // 4, (140, 60, 90), -1)
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(img, (3, 3), 0)


def smear_jpeg(seed: int = 0, h: int = 480, w: int = 640) -> bytes:
    """A JPEG (quality 90) of smear_bgr()."""
    ok, buf = cv2.imencode(".jpg", smear_bgr(seed, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def inception_bundle(work: Path, precision: str = "fp16") -> tuple[Path, Path]:
    """A real Inception V3 bundle of one precision (see inception_bundles)."""
    bundles, keys = inception_bundles(work, [precision])
    return bundles[precision], keys


def inception_bundles(work: Path, precisions: list[str]) -> tuple[dict[str, Path], Path]:
    """Make real Inception V3 bundles with the training CLI on a small synthetic set:
    synth -> prepare -> fit (bottleneck, 1 epoch, random init) -> export, once per
    precision from the same run. Returns ({precision: bundle}, trusted keys dir)."""
    train = str(BIN / "cellwatch-train")
    data, split, run, keys = work / "data", work / "split", work / "run", work / "keys"
    work.mkdir(parents=True, exist_ok=True)

    def step(*args: str) -> None:
        print("  $ cellwatch-train", " ".join(args), flush=True)
        subprocess.run([train, *args], check=True, stdout=subprocess.DEVNULL)

    step("synth", str(data), "--count", "40", "--seed", "1")
    step("prepare", str(data), "--out", str(split), "--seed", "1")
    step("fit", str(split), "--out", str(run), "--epochs", "1", "--mode", "bottleneck")
    step("keygen", str(keys), "--name", "bench")
    bundles = {}
    for version, precision in enumerate(precisions, start=1):
        bundles[precision] = work / f"bundle-{precision}"
        step(
            "export",
            str(run),
            "--out",
            str(bundles[precision]),
            "--name",
            "bench-inception",
            "--version",
            str(version),
            "--precision",
            precision,
            "--sign-key",
            str(keys / "bench.key"),
            "--allow-untrained",  # random weights: speed does not depend on them
            "--allow-no-skill",  # ... nor on skill, which 1 epoch on 40 images does not show
            "--allow-degraded",  # ... nor on the export gate
        )
    return bundles, keys


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
