"""Helpers the benchmarks share: a real broker, benchmark_app, an Inception V3 bundle.

Benchmarks print figures; they are not tests and assert nothing about time.
"""

from __future__ import annotations

import re
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

__all__ = ["BIN", "REPO", "Broker", "benchmark_app", "cpu_name", "inception_bundle", "smear_jpeg"]


def cpu_name() -> str:
    """The CPU's model name (lscpu), for the figures a benchmark prints."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def benchmark_app(
    model_xml: Path, hint: str, seconds: int = 15, device: str = "CPU"
) -> dict[str, float]:
    """Run OpenVINO's benchmark_app; returns {'throughput': FPS, 'median_ms': ...}."""
    exe = shutil.which("benchmark_app", path=str(BIN)) or "benchmark_app"
    out = subprocess.run(
        [exe, "-m", str(model_xml), "-d", device, "-hint", hint, "-t", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tput = re.search(r"Throughput:\s+([\d.]+)\s+FPS", out)
    median = re.search(r"Median:\s+([\d.]+)\s+ms", out)
    if tput is None or median is None:
        raise RuntimeError(f"cannot parse benchmark_app output:\n{out}")
    return {"throughput": float(tput.group(1)), "median_ms": float(median.group(1))}


def smear_jpeg(seed: int = 0, h: int = 480, w: int = 640) -> bytes:
    """A 640x480 JPEG with smear-like content (pale background, cells, noise)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (214, 200, 230), dtype=np.uint8)
    for _ in range(60):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(14, 24)), (150, 120, 205), -1)
    cv2.circle(img, (w // 2, h // 2), 60, (190, 160, 200), -1)
    cv2.circle(img, (w // 2, h // 2), 45, (140, 60, 90), -1)
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.GaussianBlur(img, (3, 3), 0), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def inception_bundle(work: Path, precision: str = "fp16") -> tuple[Path, Path]:
    """Make a real Inception V3 bundle with the training CLI on a small synthetic set:
    synth -> prepare -> fit (bottleneck, 1 epoch, random init) -> export. Returns
    (bundle, trusted keys dir)."""
    train = str(BIN / "cellwatch-train")
    data, split, run = work / "data", work / "split", work / "run"
    keys, bundle = work / "keys", work / f"bundle-{precision}"
    work.mkdir(parents=True, exist_ok=True)

    def step(*args: str) -> None:
        print("  $ cellwatch-train", " ".join(args), flush=True)
        subprocess.run([train, *args], check=True, stdout=subprocess.DEVNULL)

    step("synth", str(data), "--count", "40", "--seed", "1")
    step("prepare", str(data), "--out", str(split), "--seed", "1")
    step("fit", str(split), "--out", str(run), "--epochs", "1", "--mode", "bottleneck")
    step("keygen", str(keys), "--name", "bench")
    step(
        "export",
        str(run),
        "--out",
        str(bundle),
        "--name",
        "bench-inception",
        "--version",
        "1",
        "--precision",
        precision,
        "--sign-key",
        str(keys / "bench.key"),
    )
    return bundle, keys


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
