"""The operator's side of the demo: `cellwatch-hub` commands as a person types them,
and the hub's view of the fleet through its API (`cellwatch.hub.client.HubClient`,
the library those commands use)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from cellwatch.hub.client import HubClient
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.hubapi import NodeInfo
from cellwatch.shared.settings import MqttSettings
from cellwatch.shared.states import NodeState
from demolib.common import MODEL_NAME, START_TIMEOUT_S, DemoError, Layout, command, done, shown
from demolib.processes import Child, Command, ProcessGroup
from demolib.services import BrokerInfo, tool, write_operator_toml

POLL_S = 0.25


class Hub:
    """The hub process and the operator's `cellwatch-hub` commands against it."""

    def __init__(self, group: ProcessGroup, layout: Layout, broker: BrokerInfo) -> None:
        self.group = group
        self.layout = layout
        self.exe = tool("cellwatch-hub")
        self.operator_toml = write_operator_toml(layout, broker)

    def op(self, *args: str) -> list[str]:
        """An operator command (user `operator`, connection from operator.toml)."""
        return [self.exe, *args, "--config", str(self.operator_toml)]

    def serve(self) -> Child:
        argv = [self.exe, "serve", "--config", str(self.layout.hub_toml)]
        command(argv)
        return self.group.start("hub", argv)

    def push(self, bundle: Path) -> None:
        self.group.run("hub-push", self.op("push", str(bundle)), timeout=600)

    def rollout(self, version: str, waves: str, *, confirm_untrained: bool = False) -> str:
        """`rollout start` (with --yes-untrained for a synthetic or untrained model);
        prints it, returns the rollout id."""
        confirm = ["--yes-untrained"] if confirm_untrained else []
        argv = self.op("rollout", "start", MODEL_NAME, version, "--waves", waves, *confirm)
        command(argv[:-2])
        argv.append("--json")
        info = json.loads(self.group.run("hub-rollout", argv, echo=False, timeout=60))
        done(
            f"rollout {info['rollout_id']}: {MODEL_NAME} {version} to {info['target']} "
            f"({len(info['targets'])} nodes), waves {waves}"
        )
        rid: str = info["rollout_id"]
        return rid

    def watch(self, rollout_id: str) -> Command:
        """`rollout status ID --watch`, echoed as it goes; exits 0 once completed."""
        argv = self.op("rollout", "status", rollout_id, "--watch", "--interval", "0.5")
        command(argv[:-2])
        return self.group.spawn("hub-watch", argv, show=False)


class FleetView:
    """What the hub knows of the nodes, asked over its API as the operator."""

    def __init__(self, settings: MqttSettings, layout: Layout) -> None:
        self.api = HubClient(settings, timeout_s=10.0)
        self.layout = layout

    def connect(self) -> None:
        self.api.connect()

    def close(self) -> None:
        self.api.close()

    def nodes(self) -> dict[str, NodeInfo]:
        return {n.node_id: n for n in self.api.nodes().nodes}

    def serving(self) -> dict[str, str | None]:
        """node id -> the model version it serves (None: no model, or offline)."""
        return {
            n.node_id: n.model.version
            if n.model is not None and n.state is NodeState.ONLINE
            else None
            for n in self.nodes().values()
        }

    def wait_for(
        self,
        what: str,
        ready: Callable[[dict[str, NodeInfo]], bool],
        check: Callable[[], None],
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        """Until ready(nodes) holds; check() (the services are alive) on every poll."""
        deadline = time.monotonic() + timeout
        while True:
            check()
            try:
                if ready(self.nodes()):
                    return
            except CellwatchError:  # the hub is not answering yet
                pass
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the hub did not report {what} within {timeout:g} s; see "
                    f"{shown(self.layout.logs)}/"
                )
            time.sleep(POLL_S)
