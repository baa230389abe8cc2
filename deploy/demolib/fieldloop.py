"""Step 6 and the end of 7a: the fleet's own images come back (issue 20).

A fresh SYNTHETIC batch "from the field" (another seed, another stain) goes through the
lab client; the nodes keep some as samples (`[samples]` in services.write_node_toml)
and upload them to the hub. The demo waits until both nodes report their spools empty,
exports the samples with `cellwatch-hub samples export`, labels each from the
generator's ground truth (where a person would label), imports the labels with
`cellwatch-hub samples import`, and splits the batch's samples deterministically into a
training half (v2's `prepare --field`) and a held-out half, on which v1 and v2 are
measured side by side (`cellwatch-train evaluate RUN --field`).

A sample's id is its PNG's SHA-256, so the demo finds the image a sample came from by
its decoded pixels.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from cellwatch.node.decode import ImageError, decode_image
from cellwatch.shared.figures import FieldEvaluation, FieldFigures
from cellwatch.shared.hubapi import NodeInfo
from cellwatch.shared.samples import (
    SAMPLES_CSV,
    UNBIASED_NOTE,
    UNBIASED_REASON,
    SampleReason,
    SampleRow,
    SampleSet,
    read_samples,
    write_samples_csv,
)
from cellwatch.shared.schemas import SampleFigures
from cellwatch.training import IMAGE_SIZE
from cellwatch.training.dataset import LIMITS
from cellwatch.training.field import FIELD_EVAL_DIR, FIELD_FILE
from cellwatch.training.stats import fmt
from demolib.common import (
    LAB_ACCOUNT,
    LABELS,
    NODES,
    START_TIMEOUT_S,
    DemoError,
    Layout,
    Profile,
    command,
    console,
    doing,
    done,
    shown,
)
from demolib.hubctl import FleetView, Hub
from demolib.lab import Lab, truth_of
from demolib.processes import ProcessGroup
from demolib.services import cw
from demolib.summary import FieldFigures as FieldFiguresInfo
from demolib.summary import FieldLoop, FieldVersion

FIELD_SEED = 7
"""`synth --seed` of the field batch (the data set's is 0)."""
FIELD_SHIFT = "stain"
"""`synth --shift`: the field lab's stain batch differs from the data set's."""
SHOWN_ROWS = 3
"""Rows of `cellwatch-hub samples list` the demo prints."""
REASONS = (SampleReason.RANDOM, SampleReason.LOW_CONFIDENCE, SampleReason.DISAGREEMENT)
"""The unbiased `random` first, as `evaluate --field` prints them."""
ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def pixel_key(path: Path) -> str:
    """The decoded pixels' digest (as the node decodes them): a sample and the image it
    was kept from have the same one."""
    try:
        rgb = decode_image(path.read_bytes(), LIMITS, target_size=IMAGE_SIZE)
    except (OSError, ImageError) as exc:
        raise DemoError(f"{shown(path)}: cannot read its pixels: {exc}") from exc
    return hashlib.sha256(repr(rgb.shape).encode() + rgb.tobytes()).hexdigest()


class SpoolsEmpty:
    """The `ready` test of FleetView.wait_for: both nodes reported twice since `after`,
    both times with nothing waiting in their spool and the same count kept. (The first
    report may be stamped before a node's writer spooled the last image it chose.)"""

    def __init__(self, after: datetime, nodes: Sequence[str]) -> None:
        self.after = after
        self.nodes = list(nodes)
        self.reports: dict[str, dict[datetime, SampleFigures]] = {n: {} for n in self.nodes}

    def __call__(self, nodes: dict[str, NodeInfo]) -> bool:
        for node_id in self.nodes:
            telemetry = nodes[node_id].telemetry if node_id in nodes else None
            if not telemetry:
                continue
            ts = datetime.fromisoformat(str(telemetry["ts"]))
            if ts > self.after:
                figures = SampleFigures.model_validate(telemetry.get("samples") or {})
                self.reports[node_id][ts] = figures
        return all(self._settled(self.reports[n]) for n in self.nodes)

    @staticmethod
    def _settled(reports: dict[datetime, SampleFigures]) -> bool:
        last = [reports[ts] for ts in sorted(reports)[-2:]]
        return (
            len(last) == 2
            and all(f.spooled == 0 for f in last)
            and sum(last[0].kept.values()) == sum(last[1].kept.values())
        )


class FieldStep:
    """The loop: send, wait, export, label, import, split; then v1 and v2 on the held-out
    half."""

    def __init__(
        self,
        group: ProcessGroup,
        layout: Layout,
        profile: Profile,
        hub: Hub,
        fleet: FleetView,
        lab: Lab,
    ) -> None:
        self.group = group
        self.layout = layout
        self.profile = profile
        self.hub = hub
        self.fleet = fleet
        self.lab = lab
        self.sent_dir = layout.field / "sent"
        self.export_dir = layout.field / "export"
        self.train_dir = layout.field / "train"
        self.held_out_dir = layout.field / "held-out"
        self.sent_of: dict[str, Path] = {}
        """sample id -> the field image it was kept from"""

    # -- step 6 ---------------------------------------------------------------------------
    def run(self) -> FieldLoop:
        images = self.make_batch()
        doing(
            f"the lab client sends the {len(images)} images (account {LAB_ACCOUNT}, which "
            "consented); the nodes keep about half as `random` samples and the others "
            "inside the model's low-confidence band as `low_confidence`, and upload them to "
            "the hub in the background"
        )
        answers = self.lab.classify(images, window=len(NODES))
        failed = [a.answer for a in answers if a.failed]
        if failed or len(answers) != len(images):
            raise DemoError(
                f"{len(failed)} of {len(images)} field images failed and "
                f"{len(images) - len(answers)} got no answer: "
                + "; ".join(f"{Path(a.input).name}: {a.status}" for a in failed[:5])
            )
        done(f"{len(answers)} answered")
        wait_s = self.wait_for_samples()
        at_hub = self.fleet.api.samples().samples
        if not at_hub:
            raise DemoError(
                "the hub holds no field samples: the nodes kept none (is [samples] enabled, "
                f"with {LAB_ACCOUNT} in its sources, in their node.toml?)"
            )
        self.show_list()
        export = self.hub.op("samples", "export", str(self.export_dir))
        self.group.run("hub-samples-export", export, timeout=120)
        rows, from_batch = self.label(images)
        doing(
            "LABELLING: where a person would label the images (in samples.csv or Label "
            "Studio), the demo labels each from the SYNTHETIC generator's ground truth: it "
            "finds the image a sample was kept from by its decoded pixels"
        )
        write_samples_csv(self.export_dir / SAMPLES_CSV, rows)
        out = self.group.run(
            "hub-samples-import",
            self.hub.op("samples", "import", str(self.export_dir / SAMPLES_CSV)),
            timeout=120,
        )
        imported = int(out.split()[1]) if out.startswith("imported ") else 0
        if imported != len(rows):
            raise DemoError(f"`samples import` recorded {imported} of {len(rows)} labels: {out}")
        others = len(rows) - len(from_batch)
        if others:
            doing(
                f"{others} samples are step 5's test images (the same lab account, so the "
                "nodes kept some of them too): labelled and imported, but left out of both "
                "halves, since they are in the data set already"
            )
        train, held_out = self.halves(from_batch)
        by_reason = Counter(r.reason.value for r in from_batch)
        held_reasons = Counter(r.reason.value for r in held_out)
        done(
            f"the batch's {len(from_batch)} labelled samples ({counts(by_reason)}), split "
            f"deterministically (per reason, by image name, alternately): {len(train)} into "
            f"{shown(self.train_dir)}/ for training version 2, {len(held_out)} "
            f"({counts(held_reasons)}) held out in {shown(self.held_out_dir)}/: no model "
            "trains on them; both versions are measured on them in step 7"
        )
        return FieldLoop(
            sent=len(images),
            answered=len(answers),
            samples_at_hub=len(at_hub),
            field_samples=len(from_batch),
            by_reason=dict(by_reason),
            wait_s=round(wait_s, 1),
            imported=imported,
            train=len(train),
            held_out=len(held_out),
            held_out_by_reason=dict(held_reasons),
        )

    def make_batch(self) -> list[Path]:
        doing(
            f"a fresh SYNTHETIC batch of {self.profile.field_images} images 'from the field': "
            f"another seed ({FIELD_SEED}) and another stain batch (--shift {FIELD_SHIFT}), as "
            "a lab's own images differ from the training set's"
        )
        synth = cw("train", "synth", self.sent_dir, "--count", self.profile.field_images)
        synth += ["--seed", str(FIELD_SEED), "--shift", FIELD_SHIFT, "--force"]
        self.layout.field.mkdir(parents=True, exist_ok=True)
        self.group.run("train-synth-field", synth)
        images = sorted(p for p in self.sent_dir.glob("*.tif"))
        if not images:
            raise DemoError(f"`cellwatch-train synth` wrote no images into {self.sent_dir}")
        return images

    def wait_for_samples(self) -> float:
        """Until both nodes have uploaded every sample they kept; seconds waited."""
        doing(
            "waiting until both nodes report their spools empty (every sample they kept "
            "acknowledged by the hub; nodes report every 5 s)"
        )
        t0 = time.monotonic()
        self.fleet.wait_for(
            "both nodes' samples uploaded",
            SpoolsEmpty(datetime.now(UTC), NODES),
            self.group.check,
            timeout=START_TIMEOUT_S,
        )
        waited = time.monotonic() - t0
        done(f"every sample is at the hub ({waited:.0f} s)")
        return waited

    def show_list(self) -> None:
        """`cellwatch-hub samples list`, its first rows and its last line."""
        argv = self.hub.op("samples", "list")
        command(argv[:-2])
        lines = self.group.run("hub-samples-list", argv, echo=False, timeout=60).splitlines()
        body = lines[: 2 + SHOWN_ROWS]
        if len(lines) > len(body) + 1:
            body.append("...")
        for line in [*body, lines[-1]] if len(lines) > len(body) else body:
            console.print(f"      {escape(line)}")

    def label(self, images: Sequence[Path]) -> tuple[list[SampleRow], list[SampleRow]]:
        """Every exported sample labelled from the generator's truth; and those of the
        field batch (the others are copies of the data set's images)."""
        exported = read_samples(self.export_dir, LABELS, require_labels=False)
        batch = {pixel_key(p): p for p in images}
        data = {pixel_key(p): p for p in sorted(self.layout.data.glob("*.tif"))}
        rows: list[SampleRow] = []
        from_batch: list[SampleRow] = []
        for row in exported.rows:
            key = pixel_key(exported.path(row))
            source = batch.get(key) or data.get(key)
            truth = truth_of(source) if source is not None else None
            if source is None or truth is None:
                raise DemoError(
                    f"sample {row.id[:12]} matches no image the demo sent (by its pixels): "
                    f"{shown(exported.path(row))}"
                )
            labelled = row.model_copy(update={"label": truth})
            rows.append(labelled)
            if key in batch:
                from_batch.append(labelled)
                self.sent_of[row.id] = source
        if len(from_batch) < 2:
            raise DemoError(
                f"the nodes kept {len(from_batch)} of the {len(images)} field images: too few "
                "to split (see the nodes' logs)"
            )
        return rows, from_batch

    def halves(self, rows: Sequence[SampleRow]) -> tuple[list[SampleRow], list[SampleRow]]:
        """Per reason, in the order of the images' names, alternately training and
        held out; each half written as a labelled field directory."""
        train: list[SampleRow] = []
        held_out: list[SampleRow] = []
        for reason in REASONS:
            of_reason = sorted(
                (r for r in rows if r.reason is reason), key=lambda r: self.sent_of[r.id].name
            )
            train += of_reason[0::2]
            held_out += of_reason[1::2]
        exported = read_samples(self.export_dir, LABELS)
        for directory, half in ((self.train_dir, train), (self.held_out_dir, held_out)):
            write_field_dir(exported, directory, half)
        return train, held_out

    # -- step 7a: the two versions on the held-out half ------------------------------------
    def compare(
        self, runs: dict[str, tuple[str, Path]], thresholds: dict[str, float]
    ) -> dict[str, FieldVersion]:
        """`cellwatch-train evaluate RUN --field HELD_OUT` for each tag -> (version, run);
        their figures side by side. thresholds: each bundle's own (for the note)."""
        doing(
            f"both versions on the {len(read_samples(self.held_out_dir, LABELS).rows)} "
            "held-out field samples, which neither trained on (each run's TensorFlow model)"
        )
        evaluations: dict[str, FieldEvaluation] = {}
        for tag, (_, run) in runs.items():
            argv = cw("train", "evaluate", run, "--field", self.held_out_dir)
            command(argv)
            self.group.run(f"train-evaluate-field-{tag}", argv, echo=False, env=ENV)
            evaluations[tag] = FieldEvaluation.model_validate_json(
                (run / FIELD_EVAL_DIR / FIELD_FILE).read_bytes()
            )
        console.print(field_table(runs, evaluations))
        console.print(f"  [dim]note: {escape(UNBIASED_NOTE)}[/dim]")
        own = ", ".join(f"{tag} {t:.3g}" for tag, t in thresholds.items())
        threshold = next(iter(evaluations.values())).threshold
        console.print(
            f"  [dim]note: `evaluate --field` measures each run's TensorFlow model at p(ALL) >= "
            f"{threshold:g}; the bundles decide at their own thresholds ({escape(own)}), so "
            "the nodes' answers on these images can differ[/dim]"
        )
        return {
            tag: FieldVersion(
                version=runs[tag][0],
                per_reason={
                    **{r.value: figures_info(ev.per_reason[r]) for r in REASONS},
                    "all": figures_info(ev.all),
                },
                excluded=ev.excluded,
            )
            for tag, ev in evaluations.items()
        }


def write_field_dir(exported: SampleSet, directory: Path, rows: Sequence[SampleRow]) -> None:
    """A labelled field directory of some rows of an export (images copied)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for row in rows:
        shutil.copy2(exported.path(row), directory / row.file_name)
    write_samples_csv(directory / SAMPLES_CSV, rows)
    read_samples(directory, LABELS)  # as training will read it


def counts(by: Counter[str]) -> str:
    return ", ".join(f"{reason} {by[reason.value]}" for reason in REASONS if by[reason.value])


def figures_info(f: FieldFigures) -> FieldFiguresInfo:
    m = f.metrics
    return FieldFiguresInfo(
        n=f.n,
        accuracy=m.accuracy if m else None,
        sensitivity=m.sensitivity if m else None,
        specificity=m.specificity if m else None,
    )


def of_reason(reason: SampleReason) -> Callable[[FieldEvaluation], FieldFigures]:
    return lambda ev: ev.per_reason[reason]


def field_table(runs: dict[str, tuple[str, Path]], evs: dict[str, FieldEvaluation]) -> Table:
    any_ev = next(iter(evs.values()))
    table = Table(
        title=f"held-out field samples (SYNTHETIC; threshold p(ALL) >= {any_ev.threshold:g}; "
        "95% intervals)"
    )
    table.add_column("samples")
    table.add_column("figure")
    for tag, (version, _) in runs.items():
        table.add_column(f"{tag} ({version})")
    rows: list[tuple[str, Callable[[FieldEvaluation], FieldFigures]]] = []
    for reason in REASONS:
        if all(ev.per_reason[reason].n == 0 for ev in evs.values()):
            continue
        what = "unbiased" if reason is UNBIASED_REASON else "hard"
        rows.append((f"{reason.value} ({what})", of_reason(reason)))
    rows.append(("all together", lambda ev: ev.all))
    for name, pick in rows:
        for i, label in enumerate(("n", "accuracy", "sensitivity", "specificity")):
            cells = []
            for ev in evs.values():
                f = pick(ev)
                if label == "n":
                    cells.append(str(f.n))
                elif f.metrics is None:
                    cells.append("-")
                else:
                    cells.append(fmt(getattr(f.metrics, label)))
            table.add_row(name if i == 0 else "", label, *cells)
        table.add_section()
    excluded = {tag: ev.excluded for tag, ev in evs.items() if ev.excluded}
    if excluded:
        table.caption = "left out as (near-)copies of a run's training images: " + ", ".join(
            f"{tag} {n}" for tag, n in excluded.items()
        )
    return table
