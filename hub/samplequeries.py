"""The hub API's field-sample verbs (issue 20): `samples` (the list, with the class names
a label must be one of and the counts per reason and source), `samples.image` (a
sample's PNG, a part at a time, for `cellwatch-hub samples export`) and
`samples.label` (the labels `samples import` read, all or nothing).

A label must be one of the labels of the bundle whose Result the sample carries (its
manifest in the registry); for a model the registry does not store, the labels of the
models it does store, or DEFAULT_LABELS. Only the operator's account calls the hub API
(deploy/mkacl.sh).
"""

from __future__ import annotations

import base64

from cellwatch.hub.db import Database
from cellwatch.hub.errors import ApiFailure
from cellwatch.hub.registry import Registry
from cellwatch.hub.samples import SampleStore
from cellwatch.shared.codes import ApiErrorCode
from cellwatch.shared.hubapi import (
    SAMPLE_IMAGE_CHUNK_BYTES,
    SampleCount,
    SampleImageArgs,
    SampleImageReply,
    SampleLabelArgs,
    SampleLabelReply,
    SamplesArgs,
    SamplesReply,
)
from cellwatch.shared.samples import SampleReason, SampleRow

DEFAULT_LABELS = ("normal", "ALL")
"""The class names of cellwatch's bundles (training/__init__.py LABELS)."""


class SampleQueries:
    def __init__(self, db: Database, registry: Registry, store: SampleStore) -> None:
        self.db = db
        self.registry = registry
        self.store = store

    def labels_of(self, model: str) -> list[str] | None:
        """The labels of model `name@version`'s bundle, if the registry stores it."""
        name, _, version = model.partition("@")
        record = self.db.model(name, version)
        manifest = self.registry.stored_manifest(record.manifest_sha256) if record else None
        return list(manifest.labels) if manifest is not None else None

    def labels(self, rows: list[SampleRow]) -> list[str]:
        """The class names a label of these samples must be one of."""
        found: list[str] = []
        for model in sorted({r.model for r in rows}):
            for label in self.labels_of(model) or []:
                if label not in found:
                    found.append(label)
        return found or list(DEFAULT_LABELS)

    def list(self, args: SamplesArgs) -> SamplesReply:
        rows = self.db.samples(args.reason.value if args.reason is not None else None, args.source)
        counts = [
            SampleCount(reason=SampleReason(r), source=s, samples=n, labelled=lab)
            for r, s, n, lab in self.db.sample_counts()
        ]
        return SamplesReply(samples=rows, labels=self.labels(self.db.samples()), counts=counts)

    def image(self, args: SampleImageArgs) -> SampleImageReply:
        if not self.db.has_sample(args.id):
            raise ApiFailure(ApiErrorCode.NOT_FOUND, f"no sample {args.id[:12]}")
        path = self.store.path(args.id)
        try:
            with path.open("rb") as f:
                total = path.stat().st_size
                f.seek(args.offset)
                data = f.read(SAMPLE_IMAGE_CHUNK_BYTES)
        except FileNotFoundError:
            raise ApiFailure(
                ApiErrorCode.NOT_FOUND, f"sample {args.id[:12]} has no image"
            ) from None
        return SampleImageReply(
            id=args.id, offset=args.offset, total=total, data=base64.b64encode(data).decode()
        )

    def label(self, args: SampleLabelArgs, now: float) -> SampleLabelReply:
        """Every label checked first; any problem refuses them all (each one named)."""
        rows = {r.id: r for r in self.db.samples()}
        problems = []
        for sample, label in args.labels.items():
            row = rows.get(sample)
            if row is None:
                problems.append(f"{sample[:12]}...: the hub has no such sample")
                continue
            known = self.labels_of(row.model) or self.labels(list(rows.values()))
            if label not in known:
                problems.append(
                    f"{sample[:12]}...: unknown label {label!r} (known: {', '.join(known)})"
                )
        if problems:
            raise ApiFailure(
                ApiErrorCode.BAD_REQUEST,
                f"{len(problems)} problem(s), nothing labelled: " + "; ".join(problems[:5]),
            )
        self.db.set_labels(dict(args.labels))
        return SampleLabelReply(labelled=len(args.labels))
