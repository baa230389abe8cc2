"""Field samples on a node (issue 20): a real node on the project's broker, the toy model,
images sent as the lab account `client`; what the spool holds on disk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from cellwatch.node.samples import SampleKeeper, encode_png
from cellwatch.node.service import NodeService
from cellwatch.shared.samples import SampleReason, SampleRow, sample_id
from cellwatch.training.layout import SYNTHETIC_TAG
from cellwatch.training.synth import encode, smear
from tests.harness import Requester, wait_for
from tests.images import BLUE, RED, colour_image, png
from tests.node.conftest import NodeFactory

GREYS = [(120 + i, 120 + i, 120 + i) for i in range(6)]
"""Neither red nor blue: the toy answers each with low confidence (argmax < 0.6)."""


def samples_cfg(**over: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "enabled": True,
        "sources": ["client"],
        "random_share": 0.0,
        "low_confidence": True,
    }
    cfg.update(over)
    return cfg


def answer_all(requester: Requester, payloads: list[bytes]) -> list[str]:
    sent = [requester.send(p, image_id=f"s{i}") for i, p in enumerate(payloads)]
    results = [requester.result(s, 60) for s in sent]
    assert {r.status for r in results} == {"ok"}
    return [r.label or "" for r in results]


def settled(node: NodeService, images: int) -> SampleKeeper:
    """Until the keeper has decided on all images (each kept, dropped or not chosen)."""
    keeper = node.samples
    assert keeper is not None
    wait_for(lambda: node.observers.done >= images, 60, "observers saw every image")
    assert keeper.flush()
    return keeper


def spooled(node: NodeService) -> list[SampleRow]:
    keeper = node.samples
    assert keeper is not None
    root = keeper.spool.root
    return [SampleRow.model_validate_json(p.read_bytes()) for p in sorted(root.glob("*.json"))]


def test_low_confidence_samples_are_kept_up_to_the_hourly_limit(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node = node_factory(
        samples=samples_cfg(per_hour={"low_confidence": 2, "random": 0, "disagreement": 0})
    )
    payloads = [png(g) for g in GREYS[:4]] + [png(RED), png(BLUE)]
    answer_all(requester, payloads)
    keeper = settled(node, len(payloads))
    rows = spooled(node)
    assert len(rows) == 2
    assert {r.reason for r in rows} == {SampleReason.LOW_CONFIDENCE}
    assert {r.source for r in rows} == {"client"}
    assert {r.node for r in rows} == {"node-1"}
    assert {r.model for r in rows} == {"toy@1.0.0"}
    assert all(0.4 < r.p_all < 0.6 and r.label is None for r in rows)
    figures = keeper.figures()
    assert figures.kept == {"low_confidence": 2}
    assert figures.dropped == {"limit": 2}
    for r in rows:  # the file is <id>.png and hashes to its id
        assert sample_id((keeper.spool.root / f"{r.id}.png").read_bytes()) == r.id


def test_a_random_share_is_kept_whatever_the_confidence_up_to_its_limit(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node = node_factory(
        samples=samples_cfg(
            random_share=1.0,
            low_confidence=False,
            per_hour={"random": 3, "low_confidence": 0, "disagreement": 0},
        )
    )
    payloads = [png(RED), png(BLUE), png((30, 30, 200)), png((200, 30, 30)), png((50, 60, 210))]
    answer_all(requester, payloads)
    keeper = settled(node, len(payloads))
    rows = spooled(node)
    assert [r.reason for r in rows] == [SampleReason.RANDOM] * 3
    assert keeper.figures().dropped == {"limit": 2}


def test_a_source_that_did_not_consent_writes_nothing_on_disk(
    node_factory: NodeFactory, requester: Requester, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    node = node_factory(
        samples=samples_cfg(sources=["labA"], random_share=1.0, spool_dir=str(spool))
    )
    payloads = [png(g) for g in GREYS[:3]] + [png(RED)]
    answer_all(requester, payloads)
    keeper = settled(node, len(payloads))
    assert keeper.figures().kept == {}
    files = [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []
    assert files == []


def _exif_jpeg() -> bytes:
    img = Image.fromarray(colour_image(GREYS[0])[:, :, ::-1].copy())
    exif = Image.Exif()
    exif[0x010E] = "patient Jane Doe 1970-01-01"  # ImageDescription
    exif[0x0132] = "2026:12:05 09:00:00"  # DateTime
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def _text_png() -> bytes:
    img = Image.fromarray(colour_image(GREYS[1])[:, :, ::-1].copy())
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "patient Jane Doe")
    info.add_itxt("Comment", "collected 2026-12-05 at lab A")
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _png_chunks(data: bytes) -> list[bytes]:
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks


def test_a_sample_is_the_pixels_without_tiff_tags_exif_or_text_chunks(
    node_factory: NodeFactory, requester: Requester
) -> None:
    node = node_factory(samples=samples_cfg(random_share=1.0))
    tiff = encode(smear(1, 3, 0, 257, "none"), "tif")  # ImageDescription = SYNTHETIC_TAG
    assert SYNTHETIC_TAG in tiff
    payloads = [tiff, _exif_jpeg(), _text_png()]
    assert b"Jane Doe" in payloads[1] and b"Jane Doe" in payloads[2]
    answer_all(requester, payloads)
    keeper = settled(node, len(payloads))
    rows = spooled(node)
    assert len(rows) == 3
    for r in rows:
        data = (keeper.spool.root / f"{r.id}.png").read_bytes()
        assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}
        assert b"Jane Doe" not in data and SYNTHETIC_TAG not in data
        with Image.open(io.BytesIO(data)) as im:
            assert im.info == {} or set(im.info) <= {"dpi"}  # no text, no exif
            assert not im.getexif()
    # lossless: the TIFF's pixels are the sample's
    tiff_rgb = np.asarray(Image.open(io.BytesIO(tiff)).convert("RGB"))
    assert any(
        np.array_equal(
            np.asarray(Image.open(keeper.spool.root / f"{r.id}.png").convert("RGB")), tiff_rgb
        )
        for r in rows
    )


def test_the_quota_drops_samples_never_results(
    node_factory: NodeFactory, requester: Requester
) -> None:
    one = len(encode_png(colour_image(GREYS[0])[:, :, ::-1]))  # about a sample's size
    node = node_factory(samples=samples_cfg(random_share=1.0, quota_mb=1.5 * one / 1024 / 1024))
    payloads = [png(g) for g in GREYS[:4]]
    labels = answer_all(requester, payloads)
    assert len(labels) == 4  # every Result went out
    keeper = settled(node, len(payloads))
    assert len(spooled(node)) == 1
    assert keeper.figures().dropped == {"quota": 3}
    assert keeper.spool.size_bytes <= keeper.spool.quota_bytes


def test_a_corrupt_spool_file_is_skipped_and_reported(
    node_factory: NodeFactory, requester: Requester, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    node = node_factory(samples=samples_cfg(random_share=1.0, spool_dir=str(spool)))
    answer_all(requester, [png(GREYS[0]), png(GREYS[1])])
    settled(node, 2)
    good, bad = spooled(node)
    node.join()
    (spool / f"{bad.id}.json").write_text('{"id": "' + bad.id + '", "source": ')  # cut short
    garbage = "f" * 64
    (spool / f"{garbage}.json").write_text(json.dumps({"nonsense": True}))
    restarted = node_factory(samples=samples_cfg(random_share=1.0, spool_dir=str(spool)))
    keeper = restarted.samples
    assert keeper is not None
    assert [s.row.id for s in keeper.spool.pending()] == [good.id]
    assert keeper.figures().dropped == {"corrupt": 2}
    assert sorted(p.name for p in (spool / "corrupt").iterdir()) == sorted(
        [f"{bad.id}.json", f"{bad.id}.png", f"{garbage}.json"]
    )


def test_a_spool_the_disk_refuses_drops_samples_never_results(
    node_factory: NodeFactory, requester: Requester, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool's parent should be")
    node = node_factory(samples=samples_cfg(random_share=1.0, spool_dir=str(blocker / "spool")))
    payloads = [png(g) for g in GREYS[:3]]
    assert len(answer_all(requester, payloads)) == 3  # every Result went out
    keeper = settled(node, len(payloads))
    assert keeper.figures().dropped == {"disk": 3}
    assert keeper.figures().kept == {}


def test_the_limits_hold_across_a_restart(
    node_factory: NodeFactory, requester: Requester, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    cfg = samples_cfg(
        random_share=1.0,
        spool_dir=str(spool),
        per_hour={"random": 2, "low_confidence": 0, "disagreement": 0},
    )
    node = node_factory(samples=cfg)
    answer_all(requester, [png(GREYS[0]), png(GREYS[1])])
    assert settled(node, 2).figures().kept == {"random": 2}
    node.join()
    for sample in spool.glob("*.json"):  # as if the hub had them: uploaded and deleted
        sample.unlink()
        sample.with_suffix(".png").unlink()
    restarted = node_factory(samples=cfg)
    answer_all(requester, [png(GREYS[2]), png(GREYS[3])])
    keeper = settled(restarted, 2)
    assert keeper.figures().kept == {}
    assert keeper.figures().dropped == {"limit": 2}
