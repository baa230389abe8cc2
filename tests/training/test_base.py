"""The authenticated base (issue 18, point 3): a checkpoint is the published file only if
its SHA-256 says so; anything else is refused unless the user says what it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellwatch.shared.bundle import sha256_file
from cellwatch.training.base import PUBLISHED_BASES, PublishedBase, check_base
from cellwatch.training.errors import BaseError
from cellwatch.training.export import ExportOptions, export
from cellwatch.training.runinfo import load_run
from tests.training.helpers import assert_one_line_error, train


def test_the_published_table_names_its_source_and_invents_no_hash() -> None:
    (published,) = PUBLISHED_BASES
    assert "inception_v3_2016_08_28" in published.name and published.depth_multiplier == 1.0
    assert published.source.endswith("inception_v3_2016_08_28.tar.gz")
    assert published.sha256 is None  # to be confirmed: see training/base.py


def test_a_known_hash_is_verified_and_an_unknown_one_needs_base_is(
    trained_run: Path, imagenet_ckpt: Path
) -> None:
    info = load_run(trained_run)
    table = (PublishedBase("the test file", "tests", 0.25, sha256_file(imagenet_ckpt)),)
    known = check_base(info, None, table)
    assert known.verified is True and known.published == "the test file"
    with pytest.raises(BaseError, match=r"is not the published TF-Slim inception_v3\.ckpt"):
        check_base(info, None)
    claimed = check_base(info, "my own ImageNet fine-tune")
    assert claimed.verified is False and claimed.claim == "my own ImageNet fine-tune"


def test_export_refuses_an_unverified_base_in_one_line(
    trained_run: Path, signing_key: Path, tmp_path: Path
) -> None:
    """A random-weights file named inception_v3.ckpt (the tests' base) is not exported
    as if it were ImageNet's."""
    options = ExportOptions(name="b", version="1", precision="fp32", sign_key=signing_key)
    with pytest.raises(BaseError, match='--base-is "DESCRIPTION"'):
        export(trained_run, tmp_path / "refused", options)
    result = train(
        *("export", trained_run, "--out", tmp_path / "b", "--name", "x", "--version", "1"),
        *("--sign-key", signing_key),
    )
    assert_one_line_error(result, "unverified-base")
    assert not (tmp_path / "b").exists() and not (tmp_path / "refused").exists()
