"""`make demo`: the eight steps in order. Each step is a short method here; the work
is in the modules named for it (training, hubctl, lab, results, fieldloop, rollouts)."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.states import NodeState
from demolib.common import (
    DRAIN_TIMEOUT_S,
    MODEL_NAME,
    NODES,
    QUICK,
    SOURCE,
    WAVES,
    DemoError,
    Layout,
    Profile,
    Timings,
    command,
    console,
    doing,
    done,
    duration,
    shown,
    stage,
)
from demolib.fieldloop import FieldStep
from demolib.hubctl import FleetView, Hub
from demolib.lab import Lab, Traffic
from demolib.processes import ProcessGroup, stop_tier
from demolib.results import show_test_results, swap_account
from demolib.rollouts import roll_out
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
from demolib.summary import Paths, ProcessRecord, Summary
from demolib.training import Trained, Training, report


class Demo:
    """`run`: the eight steps in order; everything started is stopped at the end."""

    STEPS = 8

    def __init__(
        self,
        layout: Layout,
        profile: Profile,
        checkpoint: Path | None,
        *,
        attached: bool = True,
        http_port: int = 0,
        accurate_int8: bool = False,
    ) -> None:
        self.layout = layout
        self.http_port = http_port or free_port()
        self.profile = profile
        self.group = ProcessGroup(layout, attached=attached)
        self.training = Training(self.group, layout, profile, checkpoint)
        self.int8_methods = (
            ("auto", profile.int8_methods[1]) if accurate_int8 else (profile.int8_methods)
        )
        self.broker: BrokerInfo | None = None
        self.timings = Timings()
        self._lab: Lab | None = None
        self._hub: Hub | None = None
        self._fleet: FleetView | None = None
        self._field: FieldStep | None = None
        self.summary = Summary(
            quick=profile is QUICK,
            workdir=str(layout.root),
            nodes=list(NODES),
            model=MODEL_NAME,
            checkpoint=str(checkpoint) if checkpoint else None,
            int8="accurate" if self.int8_methods[0] == "auto" else "ptq",
        )

    @property
    def lab(self) -> Lab:
        assert self._lab is not None
        return self._lab

    @property
    def hub(self) -> Hub:
        assert self._hub is not None
        return self._hub

    @property
    def fleet(self) -> FleetView:
        assert self._fleet is not None
        return self._fleet

    @property
    def field(self) -> FieldStep:
        assert self._field is not None
        return self._field

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
        with self.timings.phase("6 field samples come back"):
            self.step_field()
        with self.timings.phase("7a train v2 with field samples, evaluate, export"):
            v2 = self.step_train_v2(v1)
        with self.timings.phase("7b roll out v2 under load"):
            self.step_swap(v1, v2, test_images)
        self.summary.ok = True

    def connect_clients(self, broker: BrokerInfo) -> None:
        """The lab client (user `client`) and the operator's view of the fleet."""
        self._lab = Lab(mqtt_settings(self.layout, broker, "client"))
        self.lab.connect()
        self._fleet = FleetView(mqtt_settings(self.layout, broker, "operator"), self.layout)
        self.fleet.connect()

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
        self.broker = start_broker(self.group, self.layout, free_port(), free_port())
        self.connect_clients(self.broker)

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
        self.fleet.wait_for("that it is ready", lambda nodes: True, self.group.check)
        done(
            f"hub running (config {shown(self.layout.hub_toml)}); it answers the operator's "
            f"commands (user operator, {shown(self.hub.operator_toml)})"
        )
        url = fleet_url(self.http_port)
        self.summary.fleet_url = url
        done(f"fleet page (live, read-only): {url}  ·  Prometheus: {url}metrics")
        boots = {n: (i.boot_id if (i := self.fleet.nodes().get(n)) else None) for n in NODES}
        for node_id in NODES:
            argv = cw("node", "run", "--config", write_node_toml(self.layout, node_id, self.broker))
            command(argv)
            self.group.start(node_id, argv)
        self.fleet.wait_for(
            "both nodes online",
            lambda nodes: all(
                n in nodes and nodes[n].state is NodeState.ONLINE and nodes[n].boot_id != boots[n]
                for n in NODES
            ),
            self.group.check,
        )
        done(f"{' and '.join(NODES)} online over TLS (port {self.broker.tls_port}), no model yet")
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
        if self.training.checkpoint is not None:
            doing(f"starting from the ImageNet weights in {self.training.checkpoint}")
        else:
            console.print(
                "  [yellow]![/yellow] no CHECKPOINT given: Inception V3 starts from "
                "RANDOM weights, so accuracy only shows that the plumbing works. "
                "Use `make demo CHECKPOINT=path/to/inception_v3.ckpt` for real "
                "ImageNet features (see the README)."
            )
        self.training.make_data()
        v1 = self.training.train("v1", "1.0.0", self.profile.epochs, self.int8_methods[0])
        report(v1)
        self.summary.trained["v1"] = v1.info()
        return v1

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
        roll_out(self.hub, self.fleet, self.group, v1.version, WAVES, None)
        self.summary.rollout_v1_s = round(time.monotonic() - t0, 1)

    def test_images(self) -> list[Path]:
        from cellwatch.training.split import load_split

        split = load_split(self.layout.split)
        return [split.root / e.path for e in split.entries("test")]

    def step_classify(self, v1: Trained) -> list[Path]:
        stage(
            5,
            self.STEPS,
            "Classify the held-out test images over MQTT",
            "Like a microscope PC would, the demo sends each test image with the lab client "
            f"library (cellwatch.client) to cellwatch/images/client/{SOURCE} (MQTT v5, QoS 1: "
            "the `client` account may publish only under its own name) with a Response Topic "
            "under cellwatch/replies/client/ and Correlation Data; whichever "
            "node takes the image answers there with a Result. Latency is measured by the "
            "client, publish to result.",
        )
        images = self.test_images()
        answers = self.lab.classify(images, window=len(NODES))
        self.summary.classify = show_test_results(answers, len(images), v1.deployed.accuracy)
        if self.summary.classify.failed:
            raise DemoError(
                f"{self.summary.classify.failed} test images failed: {self.summary.classify.errors}"
            )
        return images

    def step_field(self) -> None:
        stage(
            6,
            self.STEPS,
            "The fleet's own images come back: field samples",
            "A model is measured on its own test split, never on what the fleet sees. The "
            "nodes keep some images of the lab account that consented ([samples] in "
            "node.toml: off by default), send them to the hub, and a labeller labels them. "
            "Half of them will train version 2; the other half is held out to measure both "
            "versions on images from the field.",
        )
        self._field = FieldStep(
            self.group, self.layout, self.profile, self.hub, self.fleet, self.lab
        )
        self.summary.field = self._field.run()

    def step_train_v2(self, v1: Trained) -> Trained:
        stage(
            7,
            self.STEPS,
            "A second version, with the field samples, rolled out while images keep flowing",
            "Training a model is never done once. Version 2 trains with the field samples' "
            "training half and is measured beside version 1 on the held-out half. It goes "
            "out to the nodes while a lab client keeps sending images: each node downloads, "
            "verifies and self-tests it beside the old one and then swaps atomically, so no "
            "request fails and results switch from the old version to the new one.",
        )
        field = self.field
        v2 = self.training.train(
            "v2",
            "1.1.0",
            self.profile.epochs + 1,
            self.int8_methods[1],
            after=v1,
            field=field.train_dir,
        )
        report(v2)
        self.summary.trained["v2"] = v2.info()
        assert self.summary.field is not None
        placed = self.training.field_placement()
        self.summary.field.v2_split = placed
        done(
            "the field samples' training half is in version 2's "
            + ", ".join(f"{name} split ({n})" for name, n in placed.items() if n)
        )
        self.summary.field.evaluation = field.compare(
            {"v1": (v1.version, v1.run), "v2": (v2.version, v2.run)},
            {"v1": v1.deployed.threshold, "v2": v2.deployed.threshold},
        )
        return v2

    def step_swap(self, v1: Trained, v2: Trained, test_images: list[Path]) -> None:
        traffic = Traffic(self.lab, test_images, self.profile.swap_rate)
        doing(f"a lab client starts sending {self.profile.swap_rate:g} images per second")
        traffic.start()
        try:
            self.hub.push(v2.bundle)
            rollout_at = time.monotonic()
            switched_at = roll_out(self.hub, self.fleet, self.group, v2.version, WAVES, traffic)
            doing(f"both nodes serve {v2.version}; {self.profile.after_swap_s:g} s more of images")
            time.sleep(self.profile.after_swap_s)
        finally:
            doing("stopping the traffic and waiting for the last answers")
            traffic.stop()
        if traffic.error:
            raise DemoError(f"the lab client failed: {traffic.error}")
        swap = swap_account(traffic, rollout_at, switched_at, v1.version, v2.version)
        self.summary.swap = swap
        self.summary.versions = {"v1": v1.version, "v2": v2.version}
        if swap.failed or swap.missing:
            raise DemoError(
                f"{swap.failed} failed and {swap.missing} missing answers during the swap "
                f"(waited up to {DRAIN_TIMEOUT_S:g} s): {swap.errors}"
            )

    # -- the end --------------------------------------------------------------------------
    def paths(self) -> Paths:
        runs = sorted(self.layout.root.glob("runs/*"))
        bundles = sorted(self.layout.root.glob("bundles/*"))
        return Paths(
            plots=[str(p) for r in runs for p in sorted(r.rglob("*.png"))],
            metrics=[str(p) for r in runs for p in sorted(r.glob("eval-*/metrics.json"))],
            bundles=[str(p) for p in bundles],
            model_cards=[str(b / "MODEL_CARD.md") for b in bundles],
            logs=[str(p) for p in sorted(self.layout.logs.glob("*.log"))],
        )

    def show_paths(self, paths: Paths) -> None:
        runs = sorted({str(Path(p).parent) for p in paths.metrics})
        for label, values in (
            ("plots", [shown(p) for p in paths.plots]),
            ("metrics", [shown(p) for p in paths.metrics] or ["-"]),
            ("bundles", [shown(p) + "/" for p in paths.bundles]),
            ("cards", [shown(p) for p in paths.model_cards]),
            ("runs", [shown(Path(r).parent) + "/" for r in runs]),
            ("logs", [shown(self.layout.logs) + "/ (one file per process)"]),
            ("summary", [shown(self.layout.summary)]),
        ):
            console.print(
                f"  [bold]{label:<8}[/bold] " + "\n           ".join(escape(v) for v in values)
            )

    def finish(self) -> None:
        """Step 8 (also after a failure): say where things are, stop everything, write
        summary.json, print the table of step times."""
        s = self.summary
        if s.ok:
            stage(
                8,
                self.STEPS,
                "Where everything is, and cleaning up",
                "Everything the demo made stays in the working directory; every process it "
                "started is stopped now.",
            )
        paths = self.paths()
        if s.ok:
            self.show_paths(paths)
        for client in (self._lab, self._fleet):
            if client is not None:
                with contextlib.suppress(CellwatchError):
                    client.close()
        running = sorted(
            (c.name for c in self.group.children if c.service and c.proc.poll() is None),
            key=stop_tier,
        )
        if running:
            doing(f"stopping {', '.join(running)}")
        with self.timings.phase("8 stop everything"):
            codes = self.group.stop_all()
        stopped = {name: codes.get(name) for name in running}
        if running:
            if all(code == 0 for code in stopped.values()):
                done(f"stopped {', '.join(running)}: each exited cleanly (code 0)")
            else:
                console.print(f"  [yellow]![/yellow] exit codes: {stopped}")
        if not s.ok:
            console.print(
                f"  Logs of every process: {escape(shown(self.layout.logs))}/; "
                f"the facts of this run: {escape(shown(self.layout.summary))}"
            )
        s.phases_s = self.timings.phases
        s.total_s = round(sum(self.timings.phases.values()), 1)
        s.exit_codes = codes
        s.processes = [
            ProcessRecord(name=r.name, pid=r.pid, ticks=r.ticks) for r in self.group.history
        ]
        answered = [c.by_node for c in (s.classify, s.swap) if c is not None]
        s.nodes_answered = sorted({n for by in answered for n in by})
        seen = [c.by_version for c in (s.classify, s.swap) if c is not None]
        s.versions_seen = sorted({v for by in seen for v in by})
        s.paths = paths
        s.finished_at = datetime.now(UTC)
        self.layout.summary.write_text(s.to_json())
        console.print(self.timings_table())

    def timings_table(self) -> Table:
        table = Table(title="Where the time went", show_header=True)
        table.add_column("step")
        table.add_column("time", justify="right")
        table.add_column("share", justify="right")
        total = sum(self.timings.phases.values()) or 1.0
        for name, secs in self.timings.phases.items():
            table.add_row(name, duration(secs), f"{100 * secs / total:.0f}%")
        table.add_row("[bold]total", f"[bold]{duration(total)}", "")
        return table
