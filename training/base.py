"""Is the run's base checkpoint the published ImageNet file? (the authenticated base)

`fit` records the base checkpoint's SHA-256 (checkpoint.sha256: the file's own hash
for the public V1 `inception_v3.ckpt`). `export` compares it with the published
TF-Slim files below. A hash that is not among them is an **unverified base**: a
random-weights file named `inception_v3.ckpt` is otherwise indistinguishable from
the real one. Export refuses it unless `--base-is "WHAT IT IS"` (a user's own
pretrained checkpoint, in their words), which is recorded in the provenance
(`base_claim`) and flags the bundle `unverified-base` everywhere, as `untrained` is.

The published figure. TF-Slim's model zoo lists the checkpoint
`inception_v3_2016_08_28.tar.gz` (source: the TF-Slim README, "Pre-trained Models",
tensorflow/models research/slim/README.md, which links
http://download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz; the archive
holds one file, `inception_v3.ckpt`). Neither the README nor the download page
publishes a checksum, and this code was written where the file cannot be
downloaded. So the table holds the file's identity with its SHA-256 still to be
confirmed: until someone runs `sha256sum inception_v3.ckpt` on the extracted file
and fills `sha256` in, every base is unverified (tested with a table that holds a
known file's hash). No figure is invented here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cellwatch.training.errors import BaseError
from cellwatch.training.runinfo import RunInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedBase:
    name: str
    source: str
    depth_multiplier: float
    sha256: str | None
    """SHA-256 of the extracted checkpoint file; None: not yet confirmed."""


PUBLISHED_BASES: tuple[PublishedBase, ...] = (
    PublishedBase(
        name="TF-Slim inception_v3_2016_08_28 (inception_v3.ckpt)",
        # tensorflow/models, research/slim/README.md, "Pre-trained Models" table:
        # http://download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz
        source="http://download.tensorflow.org/models/inception_v3_2016_08_28.tar.gz",
        depth_multiplier=1.0,
        sha256=None,  # to be confirmed: sha256sum of the extracted inception_v3.ckpt
    ),
)


@dataclass(frozen=True)
class BaseCheck:
    """What export records about the base (provenance: base_verified, base_published,
    base_claim)."""

    verified: bool | None
    """None: no base (random initialisation, the `untrained` flag covers it)."""
    published: str | None
    claim: str | None


def check_base(
    info: RunInfo,
    claim: str | None,
    published: tuple[PublishedBase, ...] = PUBLISHED_BASES,
) -> BaseCheck:
    """Verify the run's base checkpoint against the published files; BaseError for an
    unknown hash without claim (--base-is)."""
    base = info.base_checkpoint
    if base is None:
        return BaseCheck(verified=None, published=None, claim=claim)
    for known in published:
        if known.sha256 is not None and known.sha256 == base.sha256:
            log.info("base checkpoint %s is the published %s", base.path, known.name)
            return BaseCheck(verified=True, published=known.name, claim=claim)
    if claim is None:
        raise BaseError(
            f"the base checkpoint {base.path} (SHA-256 {base.sha256[:16]}...) is not the "
            "published TF-Slim inception_v3.ckpt: its weights may be anything, random "
            'included; say what it is with --base-is "DESCRIPTION" to export it anyway '
            "(it is then labelled unverified-base)"
        )
    log.warning(
        "base checkpoint %s is UNVERIFIED (hash unknown); the exporter says: %s", base.path, claim
    )
    return BaseCheck(verified=False, published=None, claim=claim)
