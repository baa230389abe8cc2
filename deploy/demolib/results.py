"""What the lab client got, shown as a person reads it: step 5's table of the test
images and step 7's account of the swap under load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from cellwatch.training.stats import Proportion, fmt, wilson
from demolib.common import console, doing, done
from demolib.lab import Answered, Traffic, count, median_ms, truth_of
from demolib.summary import Classified, Swap


def test_table(answers: Sequence[Answered]) -> tuple[Table, int]:
    """The Results of the test images (in file order) and how many were right."""
    table = Table(title="Results (SYNTHETIC images; research use only, not a diagnosis)")
    for col in ("image", "truth", "label", "confidence", "node", "model", "latency ms"):
        table.add_column(col, justify="right" if col in ("confidence", "latency ms") else "left")
    correct = 0
    for a in sorted(answers, key=lambda x: x.answer.input):
        answer, image = a.answer, Path(a.answer.input)
        truth = truth_of(image)
        res = answer.result
        latency = f"{(answer.round_trip_s or 0) * 1000:.0f}"
        if res is None or res.status != "ok":
            node = res.node_id if res is not None else "-"
            table.add_row(image.name, truth or "?", f"[red]{answer.status}", "", node, "", latency)
            continue
        hit = res.label == truth
        correct += hit
        table.add_row(
            image.name,
            truth or "?",
            f"[{'green' if hit else 'red'}]{res.label}",
            f"{res.confidence or 0:.3f}{' (low)' if res.low_confidence else ''}",
            res.node_id,
            res.model.version if res.model else "",
            latency,
        )
    return table, correct


def show_test_results(answers: Sequence[Answered], sent: int, stated: Proportion) -> Classified:
    """Print the table and the accuracy over MQTT beside the bundle's own figure."""
    table, correct = test_table(answers)
    console.print(table)
    counts = count(sent, answers)
    over_mqtt = wilson(correct, sent)
    nodes = ", ".join(sorted(counts.by_node))
    done(f"accuracy over MQTT {fmt(over_mqtt)}; answers from {nodes}")
    if stated.k == correct and stated.n == sent:
        done(f"the same as the bundle's own figure for its deployed model ({fmt(stated)})")
    else:
        doing(
            f"the bundle states {fmt(stated)} for its deployed model, measured on the export "
            f"machine's CPU; the nodes' answers differ on {abs(stated.k - correct)} image(s): "
            "a device with another inference precision"
        )
    return Classified(
        **counts.model_dump(),
        accuracy=correct / sent if sent else 0.0,
        latency_ms_median=median_ms(answers),
    )


def swap_account(traffic: Traffic, rollout_at: float, switched_at: float, v1: str, v2: str) -> Swap:
    """Step 7's facts: what was answered by which version, and when, relative to
    `rollout start`."""
    answers = sorted(traffic.answers, key=lambda a: a.at)
    counts = count(traffic.sent, answers)
    first_v2 = next((a for a in answers if a.version == v2), None)
    last_v1 = next((a for a in reversed(answers) if a.version == v1), None)
    during = sum(1 for a in answers if rollout_at <= a.at <= switched_at)

    def rel(a: Answered | None) -> float | None:
        return round(a.at - rollout_at, 2) if a is not None else None

    done(
        f"{counts.sent} images sent during the swap, {counts.answered} answered "
        f"{versions_text(counts.by_version)}, {counts.failed} failed, {counts.missing} missing"
    )
    if first_v2 is not None and last_v1 is not None:
        node = first_v2.answer.result.node_id if first_v2.answer.result else ""
        done(
            f"first answer from {v2}: {rel(first_v2):+.1f} s after `rollout start` ({node}); "
            f"last answer from {v1}: {rel(last_v1):+.1f} s"
        )
    return Swap(
        **counts.model_dump(),
        rate_per_s=1.0 / traffic.period,
        answered_during_rollout=during,
        traffic_started_s=round(traffic.started_at - rollout_at, 2),
        traffic_stopped_s=round(traffic.stopped_at - rollout_at, 2),
        all_nodes_switched_s=round(switched_at - rollout_at, 2),
        first_v2_answer_s=rel(first_v2),
        last_v1_answer_s=rel(last_v1),
        last_answer_version=answers[-1].version if answers else None,
        flowing_during_rollout=traffic.started_at < rollout_at
        and traffic.stopped_at > switched_at
        and during > 0,
    )


def versions_text(by_version: dict[str, int]) -> str:
    parts = [f"{v}: {n}" for v, n in sorted(by_version.items())]
    return f"({', '.join(parts)})" if parts else ""
