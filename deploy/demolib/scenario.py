"""`make demo`: the seven steps in order."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.topics import Topics
from cellwatch.training.errors import GateError
from cellwatch.training.stats import fmt, wilson
from demolib.client import DemoClient, Hub, Request, Traffic, Trained, tally
from demolib.common import (
    DRAIN_TIMEOUT_S,
    MODEL_NAME,
    NODES,
    QUICK,
    ROLLOUT_TIMEOUT_S,
    SOURCE,
    START_TIMEOUT_S,
    WAVES,
    DemoError,
    Layout,
    Profile,
    Timings,
    command,
    console,
    doing,
    done,
    shown,
    stage,
)
from demolib.processes import Command, ProcessGroup, stop_tier, tail
from demolib.services import (
    BrokerInfo,
    cw,
    fleet_url,
    free_port,
    make_credentials,
    make_signing_key,
    mqtt_settings,
    start_broker,
    write_hub_toml,
    write_node_toml,
)

GATE_EXIT_CODE = GateError.exit_code
"""`cellwatch-train export`: the deployed model fails the export gate."""


def gate_message(log: Path) -> str:
    """The gate's one-line refusal from an export's log (its last `error:` line)."""
    lines = [line.strip() for line in tail(log, 40).splitlines() if "error:" in line]
    return lines[-1].split("error:", 1)[1].strip() if lines else "it failed the export gate"


class Demo:
    """`run`: the seven steps in order; everything started is stopped at the end."""

    STEPS = 7

    def __init__(
        self,
        layout: Layout,
        profile: Profile,
        checkpoint: Path | None,
        *,
        attached: bool = True,
        http_port: int = 0,
    ) -> None:
        self.layout = layout
        self.http_port = http_port or free_port()
        self.profile = profile
        self.checkpoint = checkpoint
        self.group = ProcessGroup(layout, attached=attached)
        self.broker: BrokerInfo | None = None
        self.timings = Timings()
        self.topics = Topics()
        self._client: DemoClient | None = None
        self._hub: Hub | None = None
        self.summary: dict[str, Any] = {
            "ok": False,
            "error": None,
            "quick": profile is QUICK,
            "workdir": str(layout.root),
            "started_at": datetime.now(UTC).isoformat(),
            "nodes": list(NODES),
            "model": MODEL_NAME,
            "checkpoint": str(checkpoint) if checkpoint else None,
        }

    @property
    def client(self) -> DemoClient:
        assert self._client is not None
        return self._client

    @property
    def hub(self) -> Hub:
        assert self._hub is not None
        return self._hub

    def make_data(self) -> None:
        """A SYNTHETIC data set and its train/val/test split, with cellwatch-train."""
        data, split = self.layout.data, self.layout.split
        synth = cw("train", "synth", data, "--count", self.profile.images, "--force")
        self.group.run("train-synth", synth)
        self.group.run("train-prepare", cw("train", "prepare", data, "--out", split, "--force"))

    def train(self, tag: str, version: str, epochs: int, int8_method: str = "ptq") -> Trained:
        """fit (bottleneck) -> evaluate -> export a signed bundle, with cellwatch-train."""
        run, bundle = self.layout.run_dir(tag), self.layout.bundle(tag)
        run.parent.mkdir(parents=True, exist_ok=True)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        base = ["--checkpoint", self.checkpoint] if self.checkpoint is not None else []
        env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        doing(
            f"training {MODEL_NAME} {version}: up to {epochs} epoch(s) of a new 2-class head on "
            "Inception V3 features (bottleneck mode: the base network runs once per image); "
            "the epoch with the lowest validation loss is kept"
        )
        fit = cw("train", "fit", self.layout.split, "--out", run, "--epochs", epochs, *base)
        self.group.run(f"train-fit-{tag}", [*fit, "--mode", "bottleneck", "--force"], env=env)
        doing("evaluating on the held-out test images (never seen in training), with 95% intervals")
        self.group.run(f"train-evaluate-{tag}", cw("train", "evaluate", run), env=env)
        precision = self.profile.precision
        doing(
            f"exporting: calibrate on the validation images, frozen graph -> OpenVINO IR "
            f"({precision}) -> the IR itself measured on the test images -> export gate -> "
            "signed bundle with a model card"
        )
        untrained = [] if self.checkpoint is not None else ["--allow-untrained"]
        if untrained:
            doing(
                "--allow-untrained: without CHECKPOINT the base network is random, so export "
                "would refuse it; the bundle is labelled UNTRAINED wherever it goes"
            )
        if precision == "int8":
            doing(
                "int8: NNCF's accuracy-aware quantisation (2-6 minutes on 2 cores) if plain "
                "quantisation misses the gate"
                if int8_method == "auto"
                else "int8: plain quantisation only (--int8-method ptq) to keep the demo "
                "short; if it misses the gate the demo ships fp16"
            )

        def export(prec: str) -> Command:
            argv = cw("train", "export", run, "--out", bundle, "--name", MODEL_NAME)
            argv += ["--version", version, "--precision", prec, *untrained]
            if prec == "int8":
                argv += ["--int8-method", int8_method]
            argv += ["--sign-key", str(self.layout.sign_key), "--force"]
            return self.group.spawn(f"train-export-{tag}-{prec}", argv, env=env)

        attempt = export(precision)
        self.group.finish(attempt, check=False)
        fallback = None
        code = attempt.child.proc.returncode
        if code == GATE_EXIT_CODE and precision == "int8":
            fallback = gate_message(attempt.child.log)
            console.print(
                f"  [yellow]![/yellow] int8 is NOT shipped: {escape(fallback)}. The demo ships "
                "fp16 instead, whose decisions the same gate checks."
            )
            precision = "fp16"
            self.group.finish(export(precision))
        elif code != 0:
            self.group.finish(attempt)  # raises with the end of its log
        manifest = json.loads((bundle / "manifest.json").read_text())
        return Trained(tag, version, run, bundle, precision, manifest, fallback)

    # -- the steps ----------------------------------------------------------------------
    def run(self) -> None:
        with self.timings.phase("1 broker, credentials, signing key"):
            self.step_broker()
        with self.timings.phase("2 hub and two nodes"):
            self.step_services()
        with self.timings.phase("3 train, evaluate, export v1"):
            v1 = self.step_train_v1()
        with self.timings.phase("4 push and roll out v1"):
            self.step_rollout_v1(v1)
        with self.timings.phase("5 classify the test images"):
            test_images = self.step_classify(v1)
        with self.timings.phase("6a train, evaluate, export v2"):
            stage(
                6,
                self.STEPS,
                "A second version, rolled out while images keep flowing",
                "Training a model is never done once. The new version goes out to the nodes "
                "while a lab client keeps sending images: each node downloads, verifies and "
                "self-tests it beside the old one and then swaps atomically, so no request "
                "fails and results switch from the old version to the new one.",
            )
            v2 = self.train("v2", "1.1.0", self.profile.epochs + 1, self.profile.int8_methods[1])
            self.report_metrics(v2)
        with self.timings.phase("6b roll out v2 under load"):
            self.step_swap(v1, v2, test_images)
        self.summary["ok"] = True

    def step_broker(self) -> None:
        stage(
            1,
            self.STEPS,
            "Broker: users, ACL, TLS certificates, signing key",
            "Every part talks through an MQTT broker (Mosquitto). Nobody may connect without "
            "a password, and the ACL limits what each user may read and write. Model bundles "
            "are signed; hub and nodes accept only bundles signed by a trusted key.",
        )
        make_credentials(self.layout, NODES)
        make_signing_key(self.group, self.layout)
        broker = start_broker(self.group, self.layout, free_port(), free_port())
        self.broker = broker
        self._client = DemoClient(mqtt_settings(self.layout, broker, "client"), self.topics)
        self.client.connect()

    def step_services(self) -> None:
        stage(
            2,
            self.STEPS,
            "The hub and two nodes",
            "The hub keeps the model registry and moves nodes from one version to the next. "
            "Each node classifies images with OpenVINO. Both nodes join the shared "
            "subscription $share/cellwatch-nodes/cellwatch/images/+, so the broker spreads "
            "the images over them. They start without a model and get one in step 4.",
        )
        assert self.broker is not None
        write_hub_toml(self.layout, self.broker, self.http_port)
        self._hub = Hub(self.group, self.layout, self.broker)
        self.hub.serve()
        self.hub.wait_for("that it is ready", lambda nodes: True)
        done(
            f"hub running (config {shown(self.layout.hub_toml)}); it answers the operator's "
            f"commands (user operator, {shown(self.hub.operator_toml)})"
        )
        url = fleet_url(self.http_port)
        self.summary["fleet_url"] = url
        done(f"fleet page (live, read-only): {url}  ·  Prometheus: {url}metrics")
        started = {}
        for node_id in NODES:
            toml = write_node_toml(self.layout, node_id, self.broker)
            argv = cw("node", "run", "--config", toml)
            command(argv)
            started[node_id] = datetime.now(UTC).replace(microsecond=0)
            self.group.start(node_id, argv)

        def online() -> bool:
            st = self.client.statuses
            return all(
                n in st and st[n].state == "online" and st[n].since >= started[n] for n in NODES
            )

        if not self.client.wait(online, START_TIMEOUT_S, self.group.check):
            raise DemoError(f"the nodes did not come online; see {shown(self.layout.logs)}/")
        done(f"{' and '.join(NODES)} online over TLS (port {self.broker.tls_port}), no model yet")
        self.hub.wait_for(
            "both nodes",
            lambda nodes: all(n in nodes and nodes[n]["state"] == "online" for n in NODES),
        )
        doing("what the hub knows about the fleet:")
        self.group.run("hub-nodes", self.hub.op("nodes"), timeout=60)

    def step_train_v1(self) -> Trained:
        stage(
            3,
            self.STEPS,
            "Train, evaluate and export version 1",
            "A SYNTHETIC data set imitates ALL-IDB blood-smear crops (`_1` = ALL blast, "
            "`_0` = normal). It is split by source image into train, validation and test; "
            "a 2-class head is trained on TF-Slim Inception V3 features and calibrated on the "
            "validation split. The converted OpenVINO model itself is measured on the test "
            "split, and export signs it only if its decisions still match TensorFlow's. "
            "Every figure comes with its 95% interval: a few dozen test images cannot show more.",
        )
        if self.checkpoint is not None:
            doing(f"starting from the ImageNet weights in {self.checkpoint}")
        else:
            console.print(
                "  [yellow]![/yellow] no CHECKPOINT given: Inception V3 starts from "
                "RANDOM weights, so accuracy only shows that the plumbing works. "
                "Use `make demo CHECKPOINT=path/to/inception_v3.ckpt` for real "
                "ImageNet features (see the README)."
            )
        self.make_data()
        v1 = self.train("v1", "1.0.0", self.profile.epochs, self.profile.int8_methods[0])
        self.report_metrics(v1)
        return v1

    def report_metrics(self, t: Trained) -> None:
        """The deployed model's own figures (from its manifest), TensorFlow's beside them."""
        m = t.manifest
        metrics = m["metrics"]
        dep, tf = t.deployed, t.tensorflow
        flags = ", ".join(f.upper() for f in t.flags)
        done(
            f"{MODEL_NAME} {t.version} ({t.precision}{', ' + flags if flags else ''}): bundle "
            f"{shown(t.bundle)}, model card {shown(t.bundle / 'MODEL_CARD.md')}"
        )
        table = Table(
            title=f"{MODEL_NAME} {t.version} on {metrics['n']} held-out test images "
            f"(SYNTHETIC; threshold p(ALL) >= {dep.threshold:.3f}; 95% intervals)"
        )
        for col in ("figure", f"deployed {t.precision} IR (what the nodes run)", "TensorFlow"):
            table.add_column(col)
        for label, key in (
            ("accuracy", "accuracy"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("ROC AUC", "roc_auc"),
        ):
            table.add_row(label, fmt(getattr(dep, key)), fmt(getattr(tf, key)))
        console.print(table)
        gate = m["provenance"]["gate"]
        done(
            f"deployed decisions equal TensorFlow's on {fmt(t.agreement, 3)}; export gate "
            f"(agreement >= {gate['min_agreement']:g}, sensitivity drop <= {gate['max_drop']:g}) "
            f"{'passed' if gate['passed'] else 'FAILED'}; measured on "
            f"{metrics['deployed']['device']} at {metrics['deployed']['inference_precision']}"
        )
        for attempt in m["provenance"].get("quantization", {}).get("attempts", []):
            shown_agreement = fmt(wilson(attempt["agreement_k"], attempt["n"]))
            done(
                f"int8 by {attempt['method']} ({attempt['seconds']:.0f} s): decisions equal "
                f"TensorFlow's on {shown_agreement}: "
                + ("passes the gate" if attempt["passed"] else "refused by the gate")
            )
        c = m.get("calibration") or {}
        d = m.get("decision") or {}
        if c:
            done(
                f"calibration on {c['n']} validation images: temperature {c['temperature']:.3g} "
                f"{'applied' if c['applied'] else 'not applied'} (ECE {c['ece_before']:.3f} -> "
                f"{c['ece_after']:.3f}); low-confidence band p(ALL) in "
                f"[{d['low_confidence'][0]:.2f}, {d['low_confidence'][1]:.2f}]"
            )
        self.summary.setdefault("trained", {})[t.tag] = {
            "version": t.version,
            "precision": t.precision,
            "fallback": t.fallback,
            "flags": t.flags,
            "metrics": metrics,
            "gate": gate,
            "calibration": c,
            "decision": d,
        }

    def step_rollout_v1(self, v1: Trained) -> None:
        stage(
            4,
            self.STEPS,
            "Push version 1 to the hub and roll it out",
            "`cellwatch-hub push` checks the bundle's signature and stores it; `rollout "
            "start` tells the nodes, wave by wave, which version they should serve. Each node "
            "downloads the bundle from the hub in chunks over MQTT, verifies every hash and "
            "the signature, compiles it, runs its self-test and only then serves it.",
        )
        self.hub.push(v1.bundle)
        doing("what the hub stores: FLAGS warn about synthetic / untrained / degraded models")
        self.group.run("hub-models", self.hub.op("models"), timeout=60)
        doing(
            f"the model is {' and '.join(f.upper() for f in v1.flags)}: `rollout start` "
            "refuses it without --yes-untrained, which the demo gives"
        )
        t0 = time.monotonic()
        self.roll_out(v1.version, None)
        self.summary["rollout_v1_s"] = round(time.monotonic() - t0, 1)

    def roll_out(self, version: str, traffic: Traffic | None) -> float:
        """Start a rollout (a canary node first, then the rest), follow it until every
        node serves version and the hub calls it completed; when the last node switched."""
        rollout_id = self.hub.rollout(version, WAVES, confirm_untrained=True)
        watch = self.hub.watch(rollout_id)
        switched_at = self.follow_rollout(version, traffic)
        self.group.finish(watch, timeout=ROLLOUT_TIMEOUT_S)
        return switched_at

    def follow_rollout(self, version: str, traffic: Traffic | None) -> float:
        """Print each node's switch (and the traffic's counts) until all serve version.
        Returns the monotonic time at which the last node switched."""
        start = time.monotonic()
        seen = {n: self.client.serving(n) for n in NODES}
        last_print = start
        while True:
            self.group.check()
            now = time.monotonic()
            for n in NODES:
                v = self.client.serving(n)
                if v != seen[n]:
                    seen[n] = v
                    done(f"{n} now serves {MODEL_NAME} {v} ({now - start:.1f} s after the start)")
            if all(v == version for v in seen.values()):
                return now
            if traffic is not None and now - last_print >= 3.0:
                last_print = now
                t = tally(list(traffic.sent))
                doing(
                    f"images sent {t['sent']}, answered {t['answered']} "
                    f"{self.versions_text(t)}, failed {t['failed']}"
                )
            if now - start > ROLLOUT_TIMEOUT_S:
                state = ", ".join(f"{n}: {v or 'no model'}" for n, v in seen.items())
                raise DemoError(
                    f"the nodes did not all serve {version} within "
                    f"{ROLLOUT_TIMEOUT_S:g} s ({state}); see "
                    f"{shown(self.layout.logs)}/"
                )
            time.sleep(0.2)

    @staticmethod
    def versions_text(t: dict[str, Any]) -> str:
        parts = [f"{v}: {n}" for v, n in sorted(t["by_version"].items())]
        return f"({', '.join(parts)})" if parts else ""

    def test_images(self) -> list[Path]:
        from cellwatch.training.split import load_split

        split = load_split(self.layout.split)
        return [split.root / e.path for e in split.entries("test")]

    def step_classify(self, v1: Trained) -> list[Path]:
        stage(
            5,
            self.STEPS,
            "Classify the held-out test images over MQTT",
            "Like a microscope PC would, the demo publishes each test image to "
            f"cellwatch/images/client/{SOURCE} (MQTT v5, QoS 1: the `client` account may publish "
            "only under its own name) with a Response Topic under "
            "cellwatch/replies/client/ and Correlation Data; whichever node takes the image "
            "answers there with a Result. Latency is measured by the client, publish to result.",
        )
        images = self.test_images()
        reqs: list[Request] = []
        window = len(NODES)
        for i, image in enumerate(images):
            self.client.wait(
                lambda: self.client.pending(reqs) < window, DRAIN_TIMEOUT_S, self.group.check
            )
            reqs.append(self.client.send(image, f"test-{i}"))
        if not self.client.wait(
            lambda: self.client.pending(reqs) == 0, DRAIN_TIMEOUT_S, self.group.check
        ):
            raise DemoError(f"{self.client.pending(reqs)} test images got no answer")
        table = Table(title="Results (SYNTHETIC images; research use only, not a diagnosis)")
        for col in ("image", "truth", "label", "confidence", "node", "model", "latency ms"):
            table.add_column(
                col, justify="right" if col in ("confidence", "latency ms") else "left"
            )
        correct = 0
        for r in reqs:
            res = r.result
            assert res is not None
            if res.status != "ok":
                table.add_row(
                    r.image.name,
                    r.truth or "?",
                    f"[red]{res.error.code if res.error else 'error'}",
                    "",
                    res.node_id,
                    "",
                    f"{r.latency_ms or 0:.0f}",
                )
                continue
            hit = res.label == r.truth
            correct += hit
            table.add_row(
                r.image.name,
                r.truth or "?",
                f"[{'green' if hit else 'red'}]{res.label}",
                f"{res.confidence or 0:.3f}{' (low)' if res.low_confidence else ''}",
                res.node_id,
                res.model.version if res.model else "",
                f"{r.latency_ms or 0:.0f}",
            )
        console.print(table)
        t = tally(reqs)
        accuracy = correct / len(reqs) if reqs else 0.0
        over_mqtt = wilson(correct, len(reqs))
        done(f"accuracy over MQTT {fmt(over_mqtt)}; answers from {', '.join(sorted(t['by_node']))}")
        stated = v1.deployed.accuracy
        if stated.k == correct:
            done(
                f"the same as the bundle's own figure for its deployed {v1.precision} model "
                f"({fmt(stated)}), measured at export"
            )
        else:
            doing(
                f"the bundle states {fmt(stated)} for its deployed model, measured on the export "
                "machine's CPU; the nodes' answers differ on "
                f"{abs(stated.k - correct)} image(s): a device with another inference precision"
            )
        if t["failed"]:
            raise DemoError(f"{t['failed']} test images failed: {t['errors']}")
        self.summary["classify"] = {
            **t,
            "accuracy": accuracy,
            "latency_ms_median": statistics.median([r.latency_ms or 0 for r in reqs] or [0.0]),
        }
        return images

    def step_swap(self, v1: Trained, v2: Trained, test_images: list[Path]) -> None:
        traffic = Traffic(self.client, test_images, self.profile.swap_rate)
        doing(f"a lab client starts sending {self.profile.swap_rate:g} images per second")
        traffic.start()
        try:
            time.sleep(2.0)
            self.hub.push(v2.bundle)
            rollout_at = time.monotonic()
            switched_at = self.roll_out(v2.version, traffic)
            doing(f"both nodes serve {v2.version}; {self.profile.after_swap_s:g} s more of images")
            time.sleep(self.profile.after_swap_s)
        finally:
            traffic.stop()
        if traffic.error:
            raise DemoError(f"the lab client could not publish: {traffic.error}")
        reqs = list(traffic.sent)
        doing("waiting for the last answers")
        self.client.wait(lambda: self.client.pending(reqs) == 0, DRAIN_TIMEOUT_S, self.group.check)
        t = tally(reqs)
        answered = sorted(
            (r for r in reqs if r.result is not None and r.result.model),
            key=lambda r: r.answered_at or 0.0,
        )
        first_v2 = next(
            (
                r
                for r in answered
                if r.result and r.result.model and r.result.model.version == v2.version
            ),
            None,
        )
        last_v1 = next(
            (
                r
                for r in reversed(answered)
                if r.result and r.result.model and r.result.model.version == v1.version
            ),
            None,
        )
        during = sum(1 for r in answered if rollout_at <= (r.answered_at or 0) <= switched_at)

        def rel(r: Request | None) -> float | None:
            return round((r.answered_at or 0) - rollout_at, 2) if r else None

        done(
            f"{t['sent']} images sent during the swap, {t['answered']} answered "
            f"{self.versions_text(t)}, {t['failed']} failed, {t['missing']} missing"
        )
        if first_v2 and last_v1:
            done(
                f"first answer from {v2.version}: {rel(first_v2):+.1f} s after `rollout start` "
                f"({first_v2.result.node_id if first_v2.result else ''}); last answer from "
                f"{v1.version}: {rel(last_v1):+.1f} s"
            )
        last = answered[-1].result if answered else None
        self.summary["swap"] = {
            **t,
            "rate_per_s": self.profile.swap_rate,
            "answered_during_rollout": during,
            "traffic_started_s": round(traffic.started_at - rollout_at, 2),
            "traffic_stopped_s": round(traffic.stopped_at - rollout_at, 2),
            "all_nodes_switched_s": round(switched_at - rollout_at, 2),
            "first_v2_answer_s": rel(first_v2),
            "last_v1_answer_s": rel(last_v1),
            "last_answer_version": last.model.version if last and last.model else None,
            "flowing_during_rollout": traffic.started_at < rollout_at
            and traffic.stopped_at > switched_at
            and during > 0,
        }
        self.summary["versions"] = {"v1": v1.version, "v2": v2.version}
        if t["failed"] or t["missing"]:
            raise DemoError(
                f"{t['failed']} failed and {t['missing']} missing answers during "
                f"the swap: {t['errors']}"
            )

    # -- the end --------------------------------------------------------------------------
    def paths(self) -> dict[str, list[str]]:
        runs = sorted(self.layout.root.glob("runs/*"))
        bundles = sorted(self.layout.root.glob("bundles/*"))
        return {
            "plots": [str(p) for r in runs for p in sorted(r.rglob("*.png"))],
            "metrics": [str(p) for r in runs for p in sorted(r.glob("eval-*/metrics.json"))],
            "bundles": [str(p) for p in bundles],
            "model_cards": [str(b / "MODEL_CARD.md") for b in bundles],
            "logs": [str(p) for p in sorted(self.layout.logs.glob("*.log"))],
        }

    def finish(self) -> None:
        """Step 7 (also after a failure): say where things are, stop everything, write
        summary.json."""
        if self.summary["ok"]:
            stage(
                7,
                self.STEPS,
                "Where everything is, and cleaning up",
                "Everything the demo made stays in the working directory; every process it "
                "started is stopped now.",
            )
        paths = self.paths()
        if self.summary["ok"]:
            runs = sorted({str(Path(p).parent) for p in paths["metrics"]})
            for label, values in (
                ("plots", [shown(p) for p in paths["plots"]]),
                ("metrics", [shown(p) for p in paths["metrics"]] or ["-"]),
                ("bundles", [shown(p) + "/" for p in paths["bundles"]]),
                ("cards", [shown(p) for p in paths["model_cards"]]),
                ("runs", [shown(Path(r).parent) + "/" for r in runs]),
                ("logs", [shown(self.layout.logs) + "/ (one file per process)"]),
                ("summary", [shown(self.layout.summary)]),
            ):
                console.print(
                    f"  [bold]{label:<8}[/bold] " + "\n           ".join(escape(v) for v in values)
                )
        if self._client is not None:
            with contextlib.suppress(CellwatchError):
                self.client.close()
        running = sorted(
            (c.name for c in self.group.children if c.service and c.proc.poll() is None),
            key=stop_tier,
        )
        if running:
            doing(f"stopping {', '.join(running)}")
        with self.timings.phase("7 stop everything"):
            codes = self.group.stop_all()
        stopped = {name: codes.get(name) for name in running}
        if running:
            if all(code == 0 for code in stopped.values()):
                done(f"stopped {', '.join(running)}: each exited cleanly (code 0)")
            else:
                console.print(f"  [yellow]![/yellow] exit codes: {stopped}")
        if not self.summary["ok"]:
            console.print(
                f"  Logs of every process: {escape(shown(self.layout.logs))}/; "
                f"the facts of this run: {escape(shown(self.layout.summary))}"
            )
        self.summary.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "phases_s": self.timings.phases,
                "total_s": round(sum(self.timings.phases.values()), 1),
                "exit_codes": codes,
                "processes": [
                    {"name": r.name, "pid": r.pid, "ticks": r.ticks} for r in self.group.history
                ],
                "nodes_answered": sorted(
                    set(self.summary.get("classify", {}).get("by_node", {}))
                    | set(self.summary.get("swap", {}).get("by_node", {}))
                ),
                "versions_seen": sorted(
                    set(self.summary.get("classify", {}).get("by_version", {}))
                    | set(self.summary.get("swap", {}).get("by_version", {}))
                ),
                "paths": paths,
            }
        )
        self.layout.summary.write_text(json.dumps(self.summary, indent=2) + "\n")
        table = Table(title="Phase timings", show_header=True)
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for name, secs in self.timings.phases.items():
            table.add_row(name, f"{secs:.1f}")
        table.add_row("[bold]total", f"[bold]{self.summary['total_s']:.1f}")
        console.print(table)
