"""Human-readable tables for the `cellwatch-hub` commands (rich)."""

from __future__ import annotations

from datetime import UTC, datetime

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cellwatch.shared.hubapi import (
    ModelInfo,
    NodeInfo,
    RevokeReply,
    RolloutInfo,
    SiteInfo,
    StatsReply,
)
from cellwatch.shared.provenance import MODEL_FLAGS
from cellwatch.shared.states import (
    TargetPhase,
    Tone,
    UpdateState,
    rolling_back,
    tone,
)

TONE_STYLES: dict[Tone, str] = {
    Tone.GOOD: "green",
    Tone.BUSY: "",
    Tone.BACK: "cyan",
    Tone.WARN: "yellow",
    Tone.BAD: "red",
    Tone.ALARM: "bold red",
    Tone.OFF: "dim",
}
"""How the tables colour each tone (shared/states.py gives every state its tone)."""


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    age = (datetime.now(UTC) - value).total_seconds()
    if age < 120:
        return f"{max(age, 0):.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _state(value: str) -> Text:
    return Text(value, style=TONE_STYLES[tone(value)])


def _target_state(state: UpdateState, phase: TargetPhase) -> Text:
    if rolling_back(phase, state):
        return Text(f"{state} (rolling back)", style=TONE_STYLES[Tone.WARN])
    return _state(state)


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for c in columns:
        table.add_column(c, no_wrap=True)
    return table


def model_flags(m: ModelInfo) -> list[str]:
    """ModelInfo's warnings, in shared.manifest.MODEL_FLAGS order."""
    return [f for f in MODEL_FLAGS if getattr(m, f.replace("-", "_"))]


def _flags(flags: list[str]) -> Text:
    if not flags:
        return Text("-", style="dim")
    return Text(",".join(f.upper() for f in flags), style="bold yellow")


def models_table(models: list[ModelInfo]) -> RenderableType:
    if not models:
        return Text("no models on the hub yet (cellwatch-hub push BUNDLE)")
    table = _table(
        "NAME", "VERSION", "SHA256", "SIZE", "PRECISION", "FLAGS", "SIGNER", "PUSHED", "REVOKED"
    )
    for m in models:
        table.add_row(
            m.name,
            m.version,
            m.manifest_sha256[:12],
            _size(m.size),
            m.precision,
            _flags(model_flags(m)),
            m.signer or "UNSIGNED",
            _when(m.pushed_at),
            Text(_when(m.revoked_at), style="red") if m.revoked_at else Text("-"),
        )
    revoked = [
        Text.assemble((f"{m.name} {m.version}: ", "bold"), (m.revoke_reason or "", "red"))
        for m in models
        if m.revoked_at
    ]
    if not revoked:
        return table
    return Group(table, Text(""), Text("revoked:", style="bold"), *revoked)


def revoke_view(r: RevokeReply) -> RenderableType:
    m = r.model
    lines = [
        Text.assemble(
            ("revoked ", "bold red"),
            f"{m.name} {m.version} ({m.manifest_sha256[:12]}): {m.revoke_reason}",
        )
    ]
    if r.aborted:
        lines.append(Text(f"aborted rollouts: {', '.join(r.aborted)}"))
    if r.moved:
        lines.append(
            Text(
                f"{len(r.moved)} node(s) told to go back to the model they ran before: "
                f"{', '.join(r.moved)}"
            )
        )
    if r.nodes:
        lines.append(
            Text(
                f"{len(r.nodes)} node(s) served it and move to their previous good bundle "
                f"(no_model without one): {', '.join(r.nodes)}"
            )
        )
    else:
        lines.append(Text("no node was serving it"))
    return Group(*lines)


def sites_lines(sites: list[SiteInfo]) -> list[Text]:
    """One line per site: its bridge's link and its nodes."""
    out = []
    for s in sites:
        if s.link_up is None:
            link = Text("no bridge heard", style="dim")
        elif s.link_up:
            link = Text("link up", style="green")
        else:
            link = Text("link DOWN: its nodes are unreachable (not failed)", style="yellow")
        when = f" since {_when(s.since)}" if s.since is not None else ""
        out.append(Text.assemble((f"site {s.site}: ", "bold"), link, f"{when}, {s.nodes} nodes"))
    return out


def nodes_table(nodes: list[NodeInfo], sites: list[SiteInfo] | None = None) -> RenderableType:
    if not nodes:
        return Text("no nodes seen yet")
    table = _table("NODE", "STATE", "MODEL", "VERSION", "TAGS", "DEVICE", "LAST SEEN", "FETCHED")
    problems = []
    for n in nodes:
        table.add_row(
            n.node_id,
            _state(n.state),
            n.model.name if n.model else "-",
            Text(n.model.version + " !", style="yellow")
            if n.model and n.model_error
            else Text(n.model.version if n.model else "-", style="red" if n.model_error else ""),
            ",".join([*n.tags, *([f"@{n.site}"] if n.site else [])]) or "-",
            n.device or "-",
            _when(n.last_seen),
            _size(n.bytes_served),
        )
        if n.model_error:
            problems.append(
                Text.assemble(
                    (f"{n.node_id}: ", "bold"),
                    (n.model_error.code, "red"),
                    f": {n.model_error.message}",
                )
            )
    parts: list[RenderableType] = [table]
    if problems:
        parts += [Text(""), Text("model errors:", style="bold"), *problems]
    if sites:
        parts += [Text(""), *sites_lines(sites)]
    return parts[0] if len(parts) == 1 else Group(*parts)


def rollout_view(r: RolloutInfo) -> RenderableType:
    total = len(r.targets)
    head = Text.assemble(
        (f"rollout {r.rollout_id}", "bold"),
        f": {r.model.name} {r.model.version} -> {r.target} ({total} nodes)  ",
        _state(r.state),
        f"  wave {max(r.wave + 1, 0)}/{len(r.waves)}",
    )
    parts: list[RenderableType] = [head]
    if r.model_flags:
        parts.append(
            Text(
                f"  model is {', '.join(f.upper() for f in r.model_flags)}: not for real "
                "decisions (see its MODEL_CARD.md)",
                style="bold yellow",
            )
        )
    if r.reason:
        parts.append(Text(f"  {r.reason}", style="dim"))
    waves = _table("WAVE", "NODES", "ISSUED", "PROGRESS")
    for w in r.waves:
        counts = ", ".join(f"{w.counts[s]} {s}" for s in UpdateState if w.counts.get(s))
        waves.add_row(str(w.index + 1), str(w.size), "yes" if w.issued else "no", counts)
    parts += [Text(""), waves, Text("")]
    targets = _table("NODE", "WAVE", "STATE", "PROGRESS", "PREVIOUS", "ERROR")
    for t in r.targets:
        targets.add_row(
            t.node_id,
            str(t.wave + 1),
            _target_state(t.state, t.phase),
            f"{t.progress:.0%}",
            f"{t.previous.name} {t.previous.version}" if t.previous else "-",
            f"{t.error.code}: {t.error.message}" if t.error else "",
        )
    parts.append(targets)
    return Group(*parts)


def rollouts_table(rollouts: list[RolloutInfo]) -> RenderableType:
    if not rollouts:
        return Text("no rollouts yet")
    table = _table("ID", "MODEL", "VERSION", "TARGET", "STATE", "WAVE", "ACTIVE", "CREATED")
    for r in rollouts:
        table.add_row(
            r.rollout_id,
            r.model.name,
            r.model.version,
            r.target,
            _state(r.state),
            f"{max(r.wave + 1, 0)}/{len(r.waves)}",
            f"{r.counts.get(UpdateState.ACTIVE, 0)}/{len(r.targets)}",
            _when(r.created_at),
        )
    return table


def stats_view(s: StatsReply) -> RenderableType:
    table = _table("NODE", "BUNDLE", "BYTES")
    for node, per in sorted(s.bytes_by_node_bundle.items()):
        for sha, n in sorted(per.items()):
            table.add_row(node, sha[:12], _size(n))
    head = Text(
        f"{_size(s.bytes_served)} of bundles served in all; since "
        f"{s.started_at.astimezone():%Y-%m-%d %H:%M:%S}: {s.fetch_requests} fetch requests, "
        f"{s.fetch_errors} errors"
    )
    return Group(head, table)
