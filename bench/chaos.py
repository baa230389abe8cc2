"""The image path under faults: real processes, steady load, one fault per scenario.

    python bench/chaos.py [--images 120] [--scenario NAME ...] [--bundle DIR --trusted-keys DIR]

Starts the project's Mosquitto, `cellwatch-hub serve`, two `cellwatch-node run`
processes (node-1, node-2, sharing the images) under a small supervisor that
restarts a node that died, after RESTART_S (systemd's Restart=on-failure,
RestartSec), and the lab client (`cellwatch.client`, its default retry settings).
Each scenario sends a steady stream of images through `classify_many`, injects
its fault once a third of them are answered, and counts what the caller got:

    kill9           a node killed with SIGKILL (the supervisor restarts it)
    kill9_dead      a node killed with SIGKILL and not restarted (the worst case)
    sigterm         a node stopped with SIGTERM, started again 5 s later
    broker_restart  the broker stopped (SIGTERM: it saves its database) and started
    poison          an image that kills the node it is sent to (test hook), twice
    retained        an image published with the retain flag, then a node restart
    duplicate_id    a second process started by mistake with node-1's id
    response_topic  images with a Response Topic outside cellwatch/replies/
    device_error    node-1's inferences fail (test hook) until it recompiles

and prints one table: scenario | sent | answered | errors | duplicates delivered
to the caller | lost | worst latency | node restarts. The tests in
tests/chaos/ run every scenario too, smaller and with shorter timers.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.supervisor import Cause, Child, Supervisor
from cellwatch.client import Answer, Client, ClientSettings
from cellwatch.node.config import NODE_SESSION_EXPIRY_S
from cellwatch.node.faults import ENV_VAR as FAULTS_ENV
from cellwatch.node.service import EXIT_NODE_ID_CONFLICT
from cellwatch.shared.mqtt import MqttClient, PublishProps
from cellwatch.shared.schemas import NodeStatus, Result
from cellwatch.shared.states import NodeState
from cellwatch.shared.topics import Topics
from tests.broker import Broker, free_port
from tests.models import write_test_bundle

T = Topics()
BIN = Path(sys.executable).parent
NODES = ("node-1", "node-2")
POISON = "poison-1"


@dataclass(frozen=True)
class Timers:
    """The timers a scenario's outcome depends on (production defaults in the bench)."""

    session_expiry_s: int = NODE_SESSION_EXPIRY_S
    """The nodes' (NodeMqttSettings default)."""
    restart_s: float = 5.0
    """The supervisor's delay before restarting a dead node (the unit's RestartSec)."""
    retry_after_s: float = ClientSettings.model_fields["retry_after_s"].default
    timeout_s: float = ClientSettings.model_fields["timeout_s"].default
    """The client's (ClientSettings defaults)."""
    reconnect_max_s: float = 2.0
    """The nodes' reconnect cap: bounds the duplicate-id fight (30 s in production)."""
    infer_timeout_s: float = 2.0
    """device_error: the node's inference watchdog (30 s in production)."""


TEST_TIMERS = Timers(
    session_expiry_s=10, restart_s=0.5, retry_after_s=2.0, timeout_s=60.0, infer_timeout_s=1.0
)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Error Results the caller got, by code (answers, not losses)."""
    duplicates: int = 0
    """Answers the caller got more than once for one input."""
    lost: int = 0
    """Inputs with no Result at all (the client gave up)."""
    worst_s: float = 0.0
    restarts: int = 0
    retries: int = 0
    dropped_duplicates: int = 0
    """Duplicate Results the client dropped (the node answered an image twice)."""
    checks: list[str] = field(default_factory=list)
    """What the scenario checked beyond the counts, and how it came out."""
    failures: list[str] = field(default_factory=list)


# -- the fleet ---------------------------------------------------------------------------


class Fleet:
    """Broker, hub, two supervised nodes and a lab client, in `work`."""

    def __init__(
        self, work: Path, timers: Timers, bundle: Path | None = None, keys: Path | None = None
    ) -> None:
        self.work = work
        self.timers = timers
        work.mkdir(parents=True, exist_ok=True)
        if bundle is None or keys is None:
            keys = work / "keys"
            bundle = write_test_bundle(work / "bundle", keys)
        self.bundle, self.keys = bundle, keys
        self.broker = Broker.create(work / "broker", nodes=list(NODES))
        self.supervisor = Supervisor(timers.restart_s)
        self.hub = self.supervisor.add(Child("hub", self._hub_argv(), work / "hub.log", {}))
        self.nodes = {
            n: self.supervisor.add(Child(n, self._node_argv(n), work / f"{n}.log", {}))
            for n in NODES
        }
        self.statuses: dict[str, NodeStatus] = {}
        self._cond = threading.Condition()
        self.watch = MqttClient(
            self.broker.settings("hub"),
            client_id="chaos-watch",
            clean_start=True,
            subscriptions=[(T.node_filter("status"), 1)],
        )
        self.watch.set_message_handler(self._on_status)
        self.client: Client | None = None

    # configuration
    def _secret(self, user: str) -> Path:
        path = self.work / f"{user}.password"
        path.write_text(self.broker.password(user))
        return path

    def _hub_argv(self) -> list[str]:
        cfg = self.work / "hub.toml"
        cfg.write_text(
            f'data_dir = "{self.work / "hub"}"\ntrusted_keys = "{self.keys}"\n'
            f'log_level = "WARNING"\n[mqtt]\nhost = "{self.broker.host}"\n'
            f'port = {self.broker.port}\npassword_file = "{self._secret("hub")}"\n'
            f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        return [str(BIN / "cellwatch-hub"), "serve", "--config", str(cfg)]

    def _node_argv(self, node_id: str) -> list[str]:
        t = self.timers
        cfg = self.work / f"{node_id}.toml"
        cfg.write_text(
            f'node_id = "{node_id}"\nlog_level = "INFO"\ntelemetry_interval_s = 2.0\n'
            f'state_dir = "{self.work / "state" / node_id}"\n'
            f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'password_file = "{self._secret(node_id)}"\n'
            f"session_expiry_s = {t.session_expiry_s}\nreconnect_max_s = {t.reconnect_max_s}\n"
            f'[model]\nbundle = "{self.bundle}"\ntrusted_keys = "{self.keys}"\n'
            f"[inference]\ntimeout_s = {t.infer_timeout_s}\nmax_device_errors = 2\n"
        )
        return [str(BIN / "cellwatch-node"), "run", "--config", str(cfg)]

    # status
    def _on_status(self, msg: object) -> None:
        payload = getattr(msg, "payload", b"")
        if not payload:
            return
        try:
            status = NodeStatus.model_validate_json(payload)
        except ValueError:
            return
        with self._cond:
            self.statuses[status.node_id] = status
            self._cond.notify_all()

    def wait_online(self, node_id: str, timeout: float = 120.0, other_than: str = "") -> None:
        """Until node_id's status says online (with a boot other than `other_than`)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (
                    (s := self.statuses.get(node_id)) is not None
                    and s.state is NodeState.ONLINE
                    and s.boot_id != other_than
                ),
                timeout,
            )
        if not ok:
            raise RuntimeError(f"{node_id} did not come online; see {self.work / node_id}.log")

    def boot_of(self, node_id: str) -> str:
        with self._cond:
            s = self.statuses.get(node_id)
            return s.boot_id if s is not None else ""

    # lifecycle
    def start(self) -> None:
        self.watch.connect()
        self.hub.start()
        for child in self.nodes.values():
            child.start()
        self.supervisor.begin()
        for node_id in NODES:
            self.wait_online(node_id)
        t = self.timers
        self.client = Client(
            ClientSettings(
                mqtt=self.broker.settings("client"),
                retry_after_s=t.retry_after_s,
                timeout_s=t.timeout_s,
            )
        )
        self.client.connect()

    def restarts(self) -> int:
        return sum(c.restarts for c in self.nodes.values())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.supervisor.close()
        self.watch.disconnect()
        self.broker.close_clients()
        self.broker.stop()


# -- load and counting ---------------------------------------------------------------------


def smear(i: int) -> bytes:
    """Image i: each its own content (a node counts crashes per content and account, so
    copies of the poison image's bytes would be taken for it)."""
    from tests import images

    colour = images.RED if i % 2 else images.BLUE
    return images.jpeg(colour, 240 + (i // 64) % 64, 320 + i % 64)


@contextmanager
def fault_at(answered: Callable[[], int], when: int, fault: Callable[[], None]) -> Iterator[None]:
    """Run fault on its own thread once answered() reaches `when`."""
    errors: list[BaseException] = []

    def run() -> None:
        while answered() < when:
            time.sleep(0.01)
        try:
            fault()
        except BaseException as exc:  # reported by the scenario, not lost in a thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="fault", daemon=True)
    thread.start()
    yield
    thread.join(300)
    if errors:
        raise errors[0]


def run_load(
    fleet: Fleet,
    row: Row,
    count: int,
    fault: Callable[[], None],
    *,
    concurrency: int = 8,
    rate_hz: float = 40.0,
) -> list[Answer]:
    """Send `count` images steadily; inject fault at a third; count the answers."""
    client = fleet.client
    assert client is not None
    before = client.stats()
    answers: list[Answer] = []

    def paced() -> Iterator[bytes]:
        for i in range(count):
            yield smear(i)
            time.sleep(1.0 / rate_hz)

    with fault_at(lambda: len(answers), count // 3, fault):
        for answer in client.classify_many(paced(), concurrency=concurrency):
            answers.append(answer)
    after = client.stats()
    tally(row, answers)
    row.retries += after.retries - before.retries
    row.dropped_duplicates += after.duplicates - before.duplicates
    return answers


def tally(row: Row, answers: list[Answer]) -> None:
    seen = Counter(a.input for a in answers)
    row.sent += len(seen)
    row.duplicates += sum(n - 1 for n in seen.values())
    for a in answers:
        if a.result is None:
            row.lost += 1
            continue
        row.answered += 1
        if a.result.error is not None:
            row.errors[a.result.error.code.value] += 1
        if a.round_trip_s is not None:
            row.worst_s = max(row.worst_s, a.round_trip_s)


def check(row: Row, ok: bool, text: str) -> None:
    row.checks.append(f"{'ok' if ok else 'FAILED'}: {text}")
    if not ok:
        row.failures.append(text)


# -- scenarios --------------------------------------------------------------------------------


def kill9(fleet: Fleet, count: int) -> Row:
    row = Row("kill9")
    node = fleet.nodes["node-2"]
    restarts = node.restarts
    run_load(fleet, row, count, lambda: node.signal(signal.SIGKILL))
    fleet.wait_online("node-2")
    check(
        row,
        node.restarts == restarts + 1 and [e.code for e in node.exits[-1:]] == [-9],
        "node-2 killed and restarted once",
    )
    return row


def kill9_dead(fleet: Fleet, count: int) -> Row:
    """The worst case: a node killed and not restarted. Its persistent session keeps
    taking its share of the images until it expires (session_expiry_s); the client's
    retries answer them through the other node."""
    row = Row("kill9_dead")
    node = fleet.nodes["node-2"]

    def kill() -> None:
        node.signal(signal.SIGKILL, restart=False)

    t0 = time.monotonic()
    run_load(fleet, row, count, kill, rate_hz=max(4.0, count / (fleet.timers.session_expiry_s / 2)))
    check(
        row,
        True,
        f"last image answered {time.monotonic() - t0:.0f} s after the load began (the session "
        f"expires {fleet.timers.session_expiry_s} s after the kill)",
    )
    node.start()
    fleet.wait_online("node-2")
    return row


def sigterm(fleet: Fleet, count: int) -> Row:
    row = Row("sigterm")
    node = fleet.nodes["node-2"]

    def stop_and_start() -> None:
        code = node.stop()  # not restarted by the supervisor until start()
        check(row, code == 0, f"node-2 exited with code {code} on SIGTERM (0 expected)")
        time.sleep(fleet.timers.restart_s)
        node.start()

    run_load(fleet, row, count, stop_and_start)
    fleet.wait_online("node-2")
    return row


def broker_restart(fleet: Fleet, count: int) -> Row:
    row = Row("broker_restart")
    run_load(fleet, row, count, fleet.broker.restart)
    for node_id in NODES:
        fleet.wait_online(node_id)
    return row


def poison(fleet: Fleet, count: int) -> Row:
    """node-1 carries the hook: the poison image goes to its direct topic."""
    row = Row("poison")
    node = fleet.nodes["node-1"]
    old = fleet.boot_of("node-1")
    first_exit = len(node.exits)
    # restart node-1 with the hook (the supervisor restarts it)
    node.signal(signal.SIGTERM, env={FAULTS_ENV: f"crash_image={POISON}"})
    fleet.wait_online("node-1", other_than=old)
    client = fleet.client
    assert client is not None
    poisoned: list[Answer] = []

    def send_poison() -> None:
        # Content of its own (smear(-1): no load image has it).
        poisoned.append(client.classify(smear(-1), image_id=POISON, node="node-1"))

    run_load(fleet, row, count, send_poison)
    tally(row, poisoned)
    got = poisoned[0].result
    code = got.error.code.value if got is not None and got.error is not None else None
    check(row, code == "poison_image", f"the poison image was answered {code} (poison_image)")
    crashes = [e for e in node.exits_since(first_exit) if e.cause is Cause.OWN and e.code == -9]
    check(row, len(crashes) == 2, f"node-1 died {len(crashes)} times on it (2: try, one retry)")
    old = fleet.boot_of("node-1")
    node.signal(signal.SIGTERM, env={})
    fleet.wait_online("node-1", other_than=old)
    return row


def retained(fleet: Fleet, count: int) -> Row:
    row = Row("retained")
    replies = T.replies("client", "chaos-retained")
    arrived: list[Result] = []
    inbox = MqttClient(
        fleet.broker.settings("client"),
        client_id="chaos-retained",
        clean_start=True,
        subscriptions=[(replies, 1)],
    )
    inbox.set_message_handler(lambda m: arrived.append(Result.model_validate_json(m.payload)))
    inbox.connect()
    topic = T.lab_images("client", "retained")
    try:
        props = PublishProps(response_topic=replies, correlation_data=b"retained-1")
        inbox.publish_wait(topic, smear(1), qos=1, retain=True, props=props)
        node = fleet.nodes["node-1"]

        def restart() -> None:
            old = fleet.boot_of("node-1")
            node.signal(signal.SIGTERM)  # the supervisor starts it again: it subscribes anew
            fleet.wait_online("node-1", other_than=old)

        run_load(fleet, row, count, restart)
        time.sleep(1.0)
        check(row, len(arrived) == 1, f"the retained image was answered {len(arrived)} time(s)")
    finally:
        inbox.publish_wait(topic, b"", qos=1, retain=True)  # clear it
        inbox.disconnect()
    return row


def duplicate_id(fleet: Fleet, count: int) -> Row:
    row = Row("duplicate_id")
    original = fleet.nodes["node-1"]
    # started by mistake by hand: not in the supervisor, so nothing restarts it
    dup = Child("node-1-duplicate", original.argv, fleet.work / "duplicate.log", {})
    first_exit = len(original.exits)

    def start_duplicate() -> None:
        dup.start()

    run_load(fleet, row, count, start_duplicate)
    deadline = time.monotonic() + 300
    while dup.running and original.running and time.monotonic() < deadline:
        time.sleep(0.1)
    codes = [dup.proc.poll() if dup.proc else None]
    codes += [e.code for e in original.exits_since(first_exit)]
    check(row, 4 in codes, f"one of the two gave up with exit code 4 (exit codes {codes})")
    dup.stop(30)
    fleet.wait_online("node-1")
    return row


def response_topic(fleet: Fleet, count: int) -> Row:
    row = Row("response_topic")
    seen: list[str] = []
    spy = MqttClient(
        fleet.broker.settings("operator"),
        client_id="chaos-spy",
        clean_start=True,
        subscriptions=[(T.results_filter(), 1), (T.status("node-1"), 1)],
    )
    spy.set_message_handler(lambda m: seen.append(m.topic))
    spy.connect()
    try:
        sender = fleet.broker.connect("client")
        # another lab's results, a node's status, another lab's replies
        bad = (T.results("otherlab"), T.status("node-1"), T.replies("otherlab", "x"))

        def foreign() -> None:
            for i, rt in enumerate(bad):
                props = PublishProps(
                    response_topic=rt, correlation_data=b"x", user=[("image_id", f"foreign-{i}")]
                )
                sender.publish_wait(T.lab_images("client", "scope-9"), smear(i), qos=1, props=props)

        run_load(fleet, row, count, foreign)
        deadline = time.monotonic() + 30
        while seen.count(T.results("client")) < len(bad) and time.monotonic() < deadline:
            time.sleep(0.05)
        answered = seen.count(T.results("client"))
        check(
            row,
            answered == len(bad),
            f"{answered} invalid_request on results/client ({len(bad)})",
        )
        check(row, T.results("otherlab") not in seen, "nothing written to results/otherlab")
        statuses = seen.count(T.status("node-1"))
        check(row, statuses <= 1, f"node-1's status topic got {statuses} message(s) (its own)")
    finally:
        spy.disconnect()
    return row


def device_error(fleet: Fleet, count: int) -> Row:
    """node-1 restarts with the hook: from its 3rd inference on, OpenVINO never calls
    back (a failed inference); the watchdog answers, then the node recompiles."""
    row = Row("device_error")
    node = fleet.nodes["node-1"]
    old = fleet.boot_of("node-1")
    node.signal(signal.SIGTERM, env={FAULTS_ENV: "infer_fail_after=3"})
    fleet.wait_online("node-1", other_than=old)
    run_load(fleet, row, count, lambda: None)
    log = node.log.read_text(errors="replace")
    check(row, "recompiling" in log, "node-1 recompiled its model after device errors")
    check(row, set(row.errors) <= {"device_error"}, f"error Results: {dict(row.errors)}")
    old = fleet.boot_of("node-1")
    node.signal(signal.SIGTERM, env={})
    fleet.wait_online("node-1", other_than=old)
    return row


def run(fleet: Fleet, name: str, count: int) -> Row:
    """One scenario; node restarts counted over all of it, and every exit attributed to
    its cause: a node that gave up on a duplicate id (exit code 4) when the scenario
    started no duplicate is a failure, however the counts came out."""
    restarts = fleet.restarts()
    first = {node_id: len(child.exits) for node_id, child in fleet.nodes.items()}
    row = SCENARIOS[name](fleet, count)
    row.restarts = fleet.restarts() - restarts
    for node_id, child in fleet.nodes.items():
        for e in child.exits_since(first[node_id]):
            if e.cause is Cause.OWN and e.code == EXIT_NODE_ID_CONFLICT and name != "duplicate_id":
                check(row, False, f"{node_id} exited {e.code} (duplicate id) with no duplicate")
    return row


SCENARIOS: dict[str, Callable[[Fleet, int], Row]] = {
    "kill9": kill9,
    "kill9_dead": kill9_dead,
    "sigterm": sigterm,
    "broker_restart": broker_restart,
    "poison": poison,
    "retained": retained,
    "duplicate_id": duplicate_id,
    "response_topic": response_topic,
    "device_error": device_error,
}


# -- output --------------------------------------------------------------------------------


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(rows: list[Row]) -> str:
    head = (
        "scenario",
        "sent",
        "answered",
        "error Results",
        "duplicates to caller",
        "lost",
        "worst latency",
        "node restarts",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        errors = ", ".join(f"{n} {c}" for c, n in sorted(r.errors.items())) or "0"
        cells = (
            r.scenario,
            str(r.sent),
            str(r.answered),
            errors,
            str(r.duplicates),
            str(r.lost),
            f"{r.worst_s:.1f} s",
            str(r.restarts),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=120, help="images per scenario")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the toy model)")
    parser.add_argument("--trusted-keys", type=Path, help="its trusted keys directory")
    args = parser.parse_args()
    names = args.scenario or list(SCENARIOS)
    work = Path(tempfile.mkdtemp(prefix="cellwatch-chaos-"))
    timers = Timers()
    print(f"cellwatch chaos bench on {cpu_name()} ({os.cpu_count()} cores); work dir {work}")
    print(
        f"nodes: session_expiry_s {timers.session_expiry_s}, restart after "
        f"{timers.restart_s:g} s; client: retry_after_s {timers.retry_after_s:g}, "
        f"timeout_s {timers.timeout_s:g}; {args.images} images per scenario",
        flush=True,
    )
    fleet = Fleet(work, timers, args.bundle, args.trusted_keys)
    rows: list[Row] = []
    try:
        fleet.start()
        for name in names:
            t0 = time.monotonic()
            row = run(fleet, name, args.images)
            rows.append(row)
            print(f"  {name}: {time.monotonic() - t0:.0f} s; " + "; ".join(row.checks), flush=True)
    finally:
        fleet.close()
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
