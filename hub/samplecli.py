"""`cellwatch-hub samples export DIR` and `samples import FILE`: the labelling round trip
on the operator's side (issue 20), over the hub API (hub/samplequeries.py).

Export writes the labelled field directory of shared/samples.py: each sample's PNG
(`<id>.png`, checked against its id), `samples.csv` (write_samples_csv: the label column
empty for a sample not labelled yet, or the label imported before) and two files for
Label Studio: `label-studio.json`, the import file with one task per sample (data.image
the image's file name, data.sample_id its id) and the node's answer as a prediction
(a pre-annotation: the predicted label, its p(ALL) as the score, the model as
model_version), and `label-studio.xml`, a labelling config of one Choices of the
bundle's class names.

Import reads back either the filled `samples.csv` (in the exported directory: shared/
samples.read_samples checks every row, label and image) or Label Studio's JSON export
(the last annotation's choice of each task; a task without one has no label). Every
problem is reported, one line each, then their count (exit 2) and nothing is imported:
an unknown or missing label, an id twice, a row of a sample the hub does not have. The
labels are sent in one `samples.label` call, which checks them again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellwatch.hub.client import HubClient
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.hubapi import SamplesReply
from cellwatch.shared.samples import (
    SAMPLES_CSV,
    SampleError,
    SampleRow,
    read_samples,
    sample_file_name,
    sample_id,
    write_samples_csv,
)

LABEL_STUDIO_TASKS = "label-studio.json"
LABEL_STUDIO_CONFIG = "label-studio.xml"
FROM_NAME, TO_NAME = "label", "image"
"""The Choices and Image tag names of label-studio.xml (the tasks' predictions use them)."""


class ImportProblems(CellwatchError):
    """An import file with problems: nothing was imported."""

    def __init__(self, where: Path, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in {where}: nothing imported")


class ExportError(CellwatchError):
    """The export directory cannot be written as asked."""


@dataclass(frozen=True)
class Exported:
    directory: Path
    samples: int


def export(
    client: HubClient, directory: Path, progress: Callable[[int, int], None] | None = None
) -> Exported:
    if (directory / SAMPLES_CSV).exists():
        raise ExportError(
            f"{directory / SAMPLES_CSV} exists (a labeller's work?): export into a new directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    reply = client.samples()
    for i, row in enumerate(reply.samples):
        data = client.sample_image(row.id)
        if sample_id(data) != row.id:
            raise ExportError(f"sample {row.id[:12]}: the hub sent bytes of another SHA-256")
        (directory / sample_file_name(row.id)).write_bytes(data)
        if progress is not None:
            progress(i + 1, len(reply.samples))
    write_samples_csv(directory / SAMPLES_CSV, reply.samples)
    tasks = [label_studio_task(row) for row in reply.samples]
    (directory / LABEL_STUDIO_TASKS).write_text(json.dumps(tasks, indent=1) + "\n")
    (directory / LABEL_STUDIO_CONFIG).write_text(label_studio_config(reply.labels))
    return Exported(directory, len(reply.samples))


def label_studio_task(row: SampleRow) -> dict[str, Any]:
    return {
        "data": {
            "image": row.file_name,
            "sample_id": row.id,
            "source": row.source,
            "reason": row.reason.value,
        },
        "predictions": [
            {
                "model_version": row.model,
                "score": row.p_all,
                "result": [
                    {
                        "from_name": FROM_NAME,
                        "to_name": TO_NAME,
                        "type": "choices",
                        "value": {"choices": [row.predicted]},
                    }
                ],
            }
        ],
    }


def label_studio_config(labels: Sequence[str]) -> str:
    choices = "\n".join(f'    <Choice value="{label}"/>' for label in labels)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def read_labels(path: Path, hub: SamplesReply) -> dict[str, str]:
    """id -> label of an import file, checked against the hub's samples and labels;
    ImportProblems listing every problem otherwise."""
    if path.suffix.lower() == ".json":
        labels, problems = _label_studio(path, hub.labels)
    elif path.name == SAMPLES_CSV:
        labels, problems = _csv(path, hub.labels)
    else:
        raise ImportProblems(
            path, [f"{path}: give the {SAMPLES_CSV} of an export or a Label Studio JSON export"]
        )
    known = {row.id for row in hub.samples}
    problems += [
        f"{where}: sample {sample[:12]}... is not one the hub has"
        for sample, (_, where) in labels.items()
        if sample not in known
    ]
    if problems:
        raise ImportProblems(path, problems)
    return {sample: label for sample, (label, _) in labels.items()}


Found = dict[str, tuple[str, str]]
"""id -> (its label, where it is: file and line or task)."""


def _csv(path: Path, labels: Sequence[str]) -> tuple[Found, list[str]]:
    try:
        found = read_samples(path.parent, labels)
    except SampleError as exc:
        return {}, [p if p.startswith(path.name) else f"{path.name}: {p}" for p in exc.problems]
    return {r.id: (r.label or "", f"{path.name}: line {found.lines[r.id]}") for r in found.rows}, []


def _label_studio(path: Path, labels: Sequence[str]) -> tuple[Found, list[str]]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, [f"{path.name}: not a Label Studio JSON export: {exc}"]
    if not isinstance(tasks, list):
        return {}, [f"{path.name}: not a Label Studio JSON export (a list of tasks)"]
    found: Found = {}
    problems: list[str] = []
    for i, task in enumerate(tasks, 1):
        where = f"{path.name}: task {i}"
        data = task.get("data") if isinstance(task, dict) else None
        sample = data.get("sample_id") if isinstance(data, dict) else None
        if not isinstance(sample, str) or not sample:
            problems.append(f"{where}: no data.sample_id")
            continue
        label = _choice(task)
        if sample in found:
            problems.append(f"{where}: sample {sample[:12]}... repeats an earlier task")
        elif label is None:
            problems.append(f"{where}: no label (label it {' or '.join(labels)})")
        elif label not in labels:
            problems.append(f"{where}: unknown label {label!r} (known: {', '.join(labels)})")
        found.setdefault(sample, (label or "", where))
    return found, problems


def _choice(task: dict[str, Any]) -> str | None:
    """The choice of the task's last annotation that was not cancelled."""
    for annotation in reversed(task.get("annotations") or []):
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            choices = result.get("value", {}).get("choices") if isinstance(result, dict) else None
            if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], str):
                return choices[0]
    return None
