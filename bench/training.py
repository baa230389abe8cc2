"""Training benchmark (not a test): bottleneck cache speed-up and inference throughput.

1. Bottleneck mode, one epoch over the training split: with a warm cache (features read
   from disk + one epoch of head training) vs. the same epoch recomputing the forward
   pass (decode + preprocess + Inception V3 forward for every image + the same head
   epoch). Target: warm >= 20x faster.
2. `benchmark_app` throughput of the fp32, fp16 and int8 IR of the same trained model
   (THROUGHPUT hint, CPU; once with OpenVINO's default inference precision and once
   forced to f32), and TensorFlow's own throughput on the frozen .pb at batch 1 (the
   original workflow's runtime).
3. The int8 export gate: plain post-training quantisation, then NNCF's accuracy-aware
   quantisation (validated on the validation split), each measured on the test split:
   decisions that agree with TensorFlow (with the Wilson interval), the deployed model's
   accuracy and sensitivity, and the seconds each took (quantise + measure).

The run is restored from a checkpoint: `--checkpoint`, or one the bench writes itself
(a 1001-class Inception V3 with random weights in the public file's format, so the
restore path is the real one while the features are not ImageNet's). Everything is
made here from SYNTHETIC data (no downloads):

    .venv/bin/python bench/training.py --work /tmp/cw-bench [--count 96] [--seconds 15]
    [--checkpoint inception_v3.ckpt]

Prints a table and writes WORK/bench.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.shared.signing import generate_keypair
from cellwatch.training.bottleneck import BottleneckCache, FeatureExtractor
from cellwatch.training.bundle_metrics import machine_name
from cellwatch.training.checkpoint import write_random_base
from cellwatch.training.evalgraph import FrozenGraph
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.fit import BOTTLENECK_CACHE_DIR, fit
from cellwatch.training.ir import Precision
from cellwatch.training.runinfo import FROZEN_FILE, FitConfig
from cellwatch.training.split import load_split, prepare
from cellwatch.training.stats import fmt, wilson
from cellwatch.training.synth import write_dataset
from cellwatch.training.tfcompat import cpu_threads
from cellwatch.training.trainer import BottleneckTrainer

log = logging.getLogger("bench.training")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")


def epoch_times(split_dir: Path, checkpoint: Path | None, repeats: int) -> dict[str, float]:
    """Best-of-repeats seconds for one bottleneck epoch, warm cache vs. recomputed."""
    split = load_split(split_dir)
    train = split.entries("train")
    labels = np.array([e.label for e in train], np.int64)
    trainer = BottleneckTrainer(FitConfig(batch_size=16, seed=0), split, checkpoint)
    extractor = FeatureExtractor(trainer.session, trainer.images, trainer.net.prelogits, split.root)
    cache = BottleneckCache(split_dir / BOTTLENECK_CACHE_DIR, trainer.base_digest)
    try:
        trainer.set_statistics(extractor.features(train, cache, "train"))  # fills the cache
        warm, cold = [], []
        for epoch in range(1, repeats + 1):
            start = time.perf_counter()
            x = extractor.features(train, cache, "train")
            trainer.train_on(x, labels, epoch)
            warm.append(time.perf_counter() - start)
            start = time.perf_counter()
            x = extractor.compute(train)
            trainer.train_on(x, labels, epoch)
            cold.append(time.perf_counter() - start)
    finally:
        extractor.close()
        trainer.close()
    return {
        "images": len(train),
        "warm_s": min(warm),
        "cold_s": min(cold),
        "speedup": min(cold) / min(warm),
    }


def benchmark_app(xml: Path, seconds: int, precision_hint: str | None) -> float:
    """Throughput (FPS) that benchmark_app reports for xml on the CPU."""
    command = [
        str(Path(sys.executable).parent / "benchmark_app"),
        "-m",
        str(xml),
        "-d",
        "CPU",
        "-hint",
        "throughput",
        "-t",
        str(seconds),
    ]
    if precision_hint:
        command += ["-infer_precision", precision_hint]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Throughput:\s+([\d.]+)\s*FPS", out)
    if match is None:
        raise RuntimeError(f"no throughput in benchmark_app output:\n{out[-2000:]}")
    return float(match.group(1))


def tensorflow_fps(frozen: Path, seconds: float) -> float:
    """Images/s of the frozen graph in a TensorFlow session, batch 1, one stream."""
    x = np.random.default_rng(0).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
    with FrozenGraph(frozen) as graph:
        graph.predict(x)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            graph.predict(x)
            done += 1
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (replaced)")
    parser.add_argument("--count", type=int, default=96, help="synthetic images")
    parser.add_argument("--seconds", type=int, default=15, help="per benchmark_app run")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per variant")
    parser.add_argument("--checkpoint", type=Path, default=None, help="base checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    work: Path = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_dataset(work / "data", args.count, seed=7)
    prepare(work / "data", work / "split", val=0.15, test=0.15, seed=1)

    report: dict[str, Any] = {
        "cpus": cpu_threads(),
        "machine": machine_name(),
        "synthetic_images": args.count,
    }
    checkpoint = args.checkpoint or write_random_base(work / "ckpt" / "inception_v3.ckpt")
    report["checkpoint"] = str(checkpoint)
    report["bottleneck_epoch"] = epoch_times(work / "split", checkpoint, args.repeats)

    fit(work / "split", work / "run", FitConfig(epochs=30, seed=1), base_checkpoint=checkpoint)
    key, _ = generate_keypair(work / "keys", "bench")
    report["throughput_fps"] = {}
    for precision in PRECISIONS:
        bundle = export(
            work / "run",
            work / f"bundle-{precision}",
            ExportOptions(
                name="bench",
                version=f"1-{precision}",
                precision=precision,
                sign_key=key,
                calibration_size=64,
                allow_degraded=True,  # throughput is measured whatever the gate says
                allow_no_skill=True,
                base_is=BENCH_BASE,
            ),
        )
        xml = bundle.file("model.xml")
        figures, gate = bundle.manifest.figures, bundle.manifest.provenance.gate
        assert figures is not None and gate is not None
        report["throughput_fps"][precision] = {
            "benchmark_app_default_precision": benchmark_app(xml, args.seconds, None),
            "benchmark_app_f32": benchmark_app(xml, args.seconds, "f32"),
            "agreement": figures.agreement.model_dump(mode="json"),
            "gate_passed": gate.passed,
        }
    report["int8_gate"] = int8_gate(work, key)
    report["throughput_fps"]["tensorflow_frozen_pb_batch1"] = tensorflow_fps(
        work / "run" / FROZEN_FILE, args.seconds
    )

    (work / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    e = report["bottleneck_epoch"]
    print(
        f"\nbottleneck epoch over {e['images']} images ({report['cpus']} CPUs): warm cache "
        f"{e['warm_s'] * 1000:.1f} ms, recomputed {e['cold_s']:.2f} s -> {e['speedup']:.0f}x"
    )
    print(f"{'model':<28}{'default prec FPS':>18}{'f32 FPS':>10}  decisions = TensorFlow's")
    for precision in PRECISIONS:
        t = report["throughput_fps"][precision]
        a = t["agreement"]
        print(
            f"{precision + ' IR (benchmark_app)':<28}"
            f"{t['benchmark_app_default_precision']:>18.1f}{t['benchmark_app_f32']:>10.1f}"
            f"  {a['k']}/{a['n']}"
        )
    print(
        f"{'frozen.pb (TensorFlow, b=1)':<28}"
        f"{report['throughput_fps']['tensorflow_frozen_pb_batch1']:>18.1f}"
    )
    gate = report["int8_gate"]
    print(
        f"\nint8 export gate on {report['machine']} ({report['cpus']} CPUs), test split "
        f"n={gate['n']}, threshold {gate['threshold']:.3f}; gate: agreement >= "
        f"{gate['min_agreement']:g}, sensitivity drop <= {gate['max_drop']:g}"
    )
    for a in gate["attempts"]:
        dep = a["deployed"]
        print(
            f"  {a['method']:<38} {a['seconds']:>6.1f} s  agreement "
            f"{fmt(wilson(a['agreement_k'], a['n']))}, accuracy "
            f"{dep['accuracy']['k']}/{dep['accuracy']['n']}, sensitivity "
            f"{dep['sensitivity']['k']}/{dep['sensitivity']['n']}: "
            f"{'passed' if a['passed'] else 'FAILED'}"
        )
    print(f"written to {work / 'bench.json'}")


BENCH_BASE = "random-weights base written by bench/training.py, not ImageNet"


def int8_gate(work: Path, key: Path) -> dict[str, Any]:
    """Export int8 with plain, then accuracy-aware quantisation (both measured and timed)."""
    bundle = export(
        work / "run",
        work / "bundle-int8-gate",
        ExportOptions(
            name="bench",
            version="1-int8-gate",
            precision="int8",
            sign_key=key,
            calibration_size=64,
            int8_method="accuracy-control",
            allow_degraded=True,  # report the figures even when the gate fails
            allow_no_skill=True,
            base_is=BENCH_BASE,
        ),
    )
    m = bundle.manifest
    gate, figures, quantization = m.provenance.gate, m.figures, m.provenance.quantization
    assert gate is not None and figures is not None and quantization is not None
    return {
        "n": gate.agreement_n,
        "threshold": figures.deployed.metrics.threshold,
        "min_agreement": gate.min_agreement,
        "max_drop": gate.max_sensitivity_drop,
        "attempts": [a.model_dump(mode="json") for a in quantization.attempts],
        "passed": gate.passed,
    }


if __name__ == "__main__":
    main()
