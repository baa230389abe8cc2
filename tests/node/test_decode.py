"""The decoder on every input kind the node issue lists (no MQTT here; the MQTT
versions of these are in test_node_mqtt.py)."""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from PIL import Image

from cellwatch.node import decode
from cellwatch.node.decode import ImageError, ImageLimits, decode_image, to_rgb8
from cellwatch.node.preprocess import central_crop_box, jpeg_scale_denominator, preprocess
from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.manifest import PreprocessingSpec
from tests import images

LIMITS = ImageLimits()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.UNDECODABLE_IMAGE),
        (images.random_bytes(), ErrorCode.UNSUPPORTED_FORMAT),
        (images.TEXT, ErrorCode.UNSUPPORTED_FORMAT),
        (images.truncated_jpeg(), ErrorCode.UNDECODABLE_IMAGE),
        (images.huge_header_png(), ErrorCode.IMAGE_TOO_LARGE),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ErrorCode.UNDECODABLE_IMAGE),
    ],
    ids=["empty", "random", "text", "truncated-jpeg", "huge-header", "png-garbage"],
)
def test_bad_payloads_have_error_codes(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(payload, LIMITS)
    assert err.value.code == code


def test_payload_over_limit() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(images.jpeg(), ImageLimits(max_bytes=10_000))
    assert err.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_pixel_limit_from_header() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(images.png(h=100, w=100), ImageLimits(max_pixels=9_999))
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE


def test_memory_bound_counts_channels_and_bytes_per_sample() -> None:
    """50 MP is within the pixel limit; as 16-bit RGBA it decodes to 400 MB, which the
    default decoded-bytes limit (256 MiB) refuses from the header, before decoding."""
    bomb = images.huge_header_png(10_000, bit_depth=16, colour_type=6, height=5_000)
    with pytest.raises(ImageError, match=r"4 channel\(s\) of 16 bits decodes to 400000000"):
        decode_image(bomb, LIMITS)
    rgb8 = images.huge_header_png(10_000, bit_depth=8, colour_type=2, height=5_000)
    limits = ImageLimits(max_decoded_bytes=100_000_000)
    with pytest.raises(ImageError, match="decodes to 150000000") as err:
        decode_image(rgb8, limits)
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE
    tiff = images.tiff16(h=400, w=500)  # 500 x 400 x 3 x 2 = 1.2 MB decoded
    with pytest.raises(ImageError, match="3 channel\\(s\\) of 16 bits decodes to 1200000"):
        decode_image(tiff, ImageLimits(max_decoded_bytes=1_000_000))
    assert decode_image(tiff, ImageLimits(max_decoded_bytes=1_300_000)).shape == (400, 500, 3)
    # a big JPEG is decoded at reduced scale: the bound counts the reduced array
    big = images.jpeg(h=1944, w=2592)
    assert decode_image(big, ImageLimits(max_decoded_bytes=972 * 1296 * 3)).shape[0] == 972


@pytest.mark.parametrize(
    "make",
    [images.jpeg, images.png, images.bmp, images.tiff16, images.rgba_png],
    ids=["jpeg", "png", "bmp", "tiff16", "rgba"],
)
def test_formats_decode_to_rgb8_with_the_right_colour(make: Callable[[], bytes]) -> None:
    rgb = decode_image(make(), LIMITS)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    r, _, b = rgb.reshape(-1, 3).mean(axis=0)
    assert r > 180 and b < 80  # RED (BGR 40,40,220) arrives as RGB with red high


def test_grayscale_and_one_pixel() -> None:
    g = decode_image(images.gray_jpeg(128), LIMITS)
    assert g.shape == (240, 320, 3)
    assert abs(float(g.mean()) - 128) < 2 and np.all(g[..., 0] == g[..., 2])
    one = decode_image(images.one_pixel_png(), LIMITS)
    assert one.shape == (1, 1, 3) and tuple(one[0, 0]) == (220, 40, 40)


def test_sixteen_bit_scales_to_eight() -> None:
    img16 = np.array([[[0, 65535, 32768]]], dtype=np.uint16)
    assert tuple(to_rgb8(img16)[0, 0]) == (128, 255, 0)  # BGR -> RGB and 16 -> 8 bit


def test_large_jpeg_decodes_at_reduced_scale() -> None:
    assert jpeg_scale_denominator(640, 480, 299) == 1
    assert jpeg_scale_denominator(2592, 1944, 299) == 2
    assert jpeg_scale_denominator(8000, 6000, 299) == 8
    rgb = decode_image(images.jpeg(h=1944, w=2592), LIMITS)
    assert rgb.shape == (972, 1296, 3)


def test_central_crop_matches_tf_arithmetic() -> None:
    # tf.image.central_crop(0.875) on 480x640 keeps rows 30..449 and columns 40..599
    assert central_crop_box(480, 640, 0.875) == (30, 40, 420, 560)
    assert central_crop_box(1, 1, 0.875) == (0, 0, 1, 1)
    assert central_crop_box(299, 299, 1.0) == (0, 0, 299, 299)


def test_preprocess_shape_and_range() -> None:
    rgb = decode_image(images.jpeg(), LIMITS)
    x = preprocess(rgb, PreprocessingSpec())
    assert x.shape == (1, 299, 299, 3) and x.dtype == np.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    white = np.full((10, 10, 3), 255, dtype=np.uint8)
    assert np.allclose(preprocess(white, PreprocessingSpec()), 1.0)


# -- the JPEG decoder: simplejpeg's pixels are OpenCV's ----------------------------


def _jpeg_variants() -> dict[str, bytes]:
    """JPEGs as cameras and tools write them: 4:4:4 / 4:2:2 / 4:2:0, progressive, restart
    markers, optimised Huffman tables, grayscale, sizes that are not whole MCUs."""
    rng = np.random.default_rng(5)
    out: dict[str, bytes] = {}
    for h, w in [(480, 640), (333, 517), (17, 9)]:
        bgr = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        rgb = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        for sub in (0, 1, 2):
            for progressive in (False, True):
                b = io.BytesIO()
                rgb.save(b, "JPEG", quality=88, subsampling=sub, progressive=progressive)
                out[f"{w}x{h}-sub{sub}-{'prog' if progressive else 'base'}"] = b.getvalue()
        out[f"{w}x{h}-restart"] = images.encode(bgr, ".jpg", [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])
        out[f"{w}x{h}-optimized"] = images.encode(bgr, ".jpg", [cv2.IMWRITE_JPEG_OPTIMIZE, 1])
        out[f"{w}x{h}-gray"] = images.encode(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), ".jpg")
    return out


def _opencv_rgb(data: bytes, denom: int) -> np.ndarray:
    flags = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags[denom])
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("name", sorted(_jpeg_variants()))
def test_jpeg_pixels_are_opencvs_at_every_scale(name: str) -> None:
    """Bundles were trained on OpenCV's pixels: the faster decoder must give the very
    same ones (not close: equal), at full and every reduced scale."""
    data = _jpeg_variants()[name]
    assert decode._decode_jpeg_rgb(data, *Image.open(io.BytesIO(data)).size, 1) is not None
    np.testing.assert_array_equal(decode_image(data, LIMITS), _opencv_rgb(data, 1))
    h, w = _opencv_rgb(data, 1).shape[:2]
    for denom in (2, 4, 8):
        fast = decode._decode_jpeg_rgb(data, w, h, denom)
        assert fast is not None
        np.testing.assert_array_equal(fast, _opencv_rgb(data, denom), err_msg=f"1/{denom}")
    big = images.jpeg(h=1944, w=2592)  # decode_image's own reduced scale (1/2)
    np.testing.assert_array_equal(decode_image(big, LIMITS), _opencv_rgb(big, 2))


def test_exif_rotated_jpeg_is_turned_as_opencv_turns_it() -> None:
    """OpenCV applies the EXIF orientation; libjpeg alone does not: such files take
    OpenCV's path, so a rotated photo arrives upright in training and on the node."""
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :50] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, "JPEG", exif=exif.tobytes())
    out = decode_image(b.getvalue(), LIMITS)
    assert out.shape == (200, 100, 3)
    np.testing.assert_array_equal(out, _opencv_rgb(b.getvalue(), 1))


def test_cmyk_jpeg_takes_opencvs_path() -> None:
    cmyk = Image.new("CMYK", (64, 48), (0, 200, 200, 0))  # red, in ink
    b = io.BytesIO()
    cmyk.save(b, "JPEG")
    assert decode._decode_jpeg_rgb(b.getvalue(), 64, 48, 1) is None
    out = decode_image(b.getvalue(), LIMITS)
    np.testing.assert_array_equal(out, _opencv_rgb(b.getvalue(), 1))
    r, g, _ = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 100


def test_truncated_jpeg_is_refused_by_both_paths() -> None:
    data = images.truncated_jpeg()
    assert decode._decode_jpeg_rgb(data, 640, 480, 1) is None
    with pytest.raises(ImageError, match="truncated JPEG"):
        decode_image(data, LIMITS)
