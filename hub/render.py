"""Human-readable tables for the `cellwatch-hub` commands (rich)."""

from __future__ import annotations

from datetime import UTC, datetime

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cellwatch.shared.figures import Proportion
from cellwatch.shared.hubapi import (
    ModelInfo,
    NodeInfo,
    RevokeReply,
    RolloutInfo,
    SamplesReply,
    ShadowInfo,
    SiteInfo,
    StatsReply,
)
from cellwatch.shared.promotion import duration_text
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


def drift_text(n: NodeInfo) -> Text:
    """A node's drift state, its worst signal, and the label-free accuracy estimate."""
    d = n.drift
    if d is None:
        return Text("-", style="dim")
    if d.state == "no_reference":
        return Text("no reference", style="dim")
    if d.state == "collecting":
        return Text(f"collecting {d.n}", style="dim")
    moved = [f"{sig} {s.psi:.2f}" for sig, s in d.signals.items() if s.state != "ok" and s.psi]
    text = _state(d.state)
    if moved:
        text.append(f" ({', '.join(moved)})")
    return text


def shares_text(shares: dict[str, float] | None) -> str:
    if not shares:
        return "-"
    return " ".join(f"{label} {share:.0%}" for label, share in shares.items())


def nodes_table(nodes: list[NodeInfo], sites: list[SiteInfo] | None = None) -> RenderableType:
    if not nodes:
        return Text("no nodes seen yet")
    table = _table(
        "NODE",
        "STATE",
        "MODEL",
        "VERSION",
        "TAGS",
        "DEVICE",
        "LAST SEEN",
        "FETCHED",
        "DRIFT",
        "LABELS (1 H)",
    )
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
            drift_text(n),
            shares_text(n.shares_1h),
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
    if r.shadow is not None:
        parts += [Text(""), shadow_view(r.rollout_id, r.shadow, r.reason)]
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


def proportion(p: Proportion) -> str:
    if p.value is None or p.ci95 is None:
        return "-"
    return f"{p.value:.3f} (95% CI {p.ci95[0]:.3f}-{p.ci95[1]:.3f}, {p.k}/{p.n})"


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def shadow_view(rollout_id: str, s: ShadowInfo, reason: str | None = None) -> RenderableType:
    """A rollout's shadow phase: settings, the pooled evidence, per node."""
    length = f", for up to {duration_text(s.shadow_for_s)}" if s.shadow_for_s else ""
    rule = f"promote when {s.promote_when}" if s.promote_when else "promoted by the operator"
    head = Text.assemble(
        ("shadow phase", "bold"),
        f": {s.rate:.0%} of live images, {rule}{length}",
        (" (open)" if s.open else " (over)", "" if s.open else "dim"),
    )
    need = f" of {s.n_required} needed" if s.n_required else ""
    lines: list[RenderableType] = [
        head,
        # once over, its outcome (unless the rollout's reason above says it already)
        *([Text(f"  {s.verdict}")] if s.open or not reason or reason not in s.verdict else []),
        Text(
            f"  {s.agreement.n} images scored{need}; {s.skipped} skipped (live images waiting)"
            + (f"; {s.failed} node(s) could not load it" if s.failed else ""),
            style="dim",
        ),
    ]
    if s.open and s.ends_at is not None:
        lines.append(Text(f"  pauses for the operator {_until(s.ends_at)}", style="dim"))
    lat = s.latency
    if lat.active_p50 is not None:
        lines.append(
            Text(
                f"  inference p50/p99: serving {_ms(lat.active_p50)}/{_ms(lat.active_p99)} ms, "
                f"candidate {_ms(lat.candidate_p50)}/{_ms(lat.candidate_p99)} ms "
                f"(delta {_ms(lat.delta_p50, True)}/{_ms(lat.delta_p99, True)} ms)"
            )
        )
    if s.mean_abs_dp is not None:
        lines.append(
            Text(f"  |p difference|: mean {s.mean_abs_dp:.3f}, max {s.max_abs_dp or 0.0:.3f}")
        )
    if s.confusion:
        conf = _table("SERVING / CANDIDATE", *s.labels)
        for active in s.labels:
            row = s.confusion.get(active, {})
            conf.add_row(active, *(str(row.get(c, 0)) for c in s.labels))
        lines += [Text(""), conf]
    nodes = _table("NODE", "SHADOW", "AGREEMENT", "SKIPPED", "WINDOWS", "LAST WINDOW", "ERROR")
    for n in s.nodes:
        nodes.add_row(
            n.node_id,
            _state(n.state) if n.state else Text("-", style="dim"),
            proportion(n.agreement),
            str(n.skipped),
            str(n.windows),
            _when(n.last_at),
            f"{n.error.code}: {n.error.message}" if n.error else "",
        )
    lines += [Text(""), nodes]
    if s.disagreements:
        lines += [Text(""), Text("latest disagreements (image hash, serving -> candidate):")]
        for d in s.disagreements[:5]:
            lines.append(
                Text(
                    f"  {d.node_id} {d.image_sha256[:16]} from {d.source or '-'}: "
                    f"{d.active_label} -> {d.candidate_label}"
                )
            )
    if s.open:
        lines.append(
            Text(
                f"  `cellwatch-hub rollout promote {rollout_id}` begins the waves now, "
                f"`rollout abort {rollout_id}` stops",
                style="dim",
            )
        )
    return Group(*lines)


def _until(value: datetime) -> str:
    left = (value - datetime.now(UTC)).total_seconds()
    if left <= 0:
        return "now"
    if left < 120:
        return f"in {left:.0f} s"
    if left < 7200:
        return f"in {left / 60:.0f} min"
    return f"in {left / 3600:.1f} h"


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


def samples_table(reply: SamplesReply) -> RenderableType:
    """The field samples (newest last), then the counts per reason and source."""
    table = _table("SAMPLE", "SOURCE", "NODE", "MODEL", "P(ALL)", "PREDICTED", "REASON", "LABEL")
    for r in reply.samples:
        table.add_row(
            r.id[:12],
            r.source,
            r.node,
            r.model,
            f"{r.p_all:.3f}",
            r.predicted,
            r.reason.value,
            r.label or "-",
        )
    if not reply.samples:
        return Text("no field samples")
    return Group(table, Text(f"{len(reply.samples)} samples; labels: {', '.join(reply.labels)}"))
