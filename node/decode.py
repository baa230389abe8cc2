"""Image payload -> RGB 8-bit array, refusing bad input before it costs anything.

Order of checks: payload size, format signature (JPEG, PNG, BMP, TIFF), then from
the header alone (Pillow reads only the header, PNG's IHDR is read directly): the
pixel count, and the memory the decoded array will take (width x height x channels
x bytes per sample), then the decode. 16-bit and float images are scaled to 8-bit,
grayscale and RGBA become RGB, converting in place where the shape allows. Large
JPEGs are decoded at a reduced scale (libjpeg's DCT scaling), the rule in
`preprocess.jpeg_scale_denominator`, which training applies too.

JPEGs go through libjpeg-turbo by simplejpeg, straight to RGB: the same pixels as
OpenCV's decode (the same library and settings; tests/node/test_decode.py holds them
equal across subsamplings, progressive, restart markers, odd sizes and every
scale) for about 30% less CPU and no BGR -> RGB pass. Whatever simplejpeg does not
decode cleanly or exactly as OpenCV would (an EXIF rotation, which OpenCV applies;
CMYK; corrupt or truncated data) takes OpenCV's path, which decides as it always did.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from cellwatch.node.preprocess import jpeg_scale_denominator
from cellwatch.shared.codes import ErrorCode
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.limits import MAX_DECODED_BYTES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit from the header, without warnings

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_JPEG_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


class ImageError(CellwatchError):
    """An image payload that cannot be classified; `code` goes into the error Result."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    channels: int
    """Channels of OpenCV's decoded array (a palette or gray+alpha expands)."""
    bytes_per_sample: int
    orientation: int = 1
    """EXIF orientation of a JPEG (1: as stored; OpenCV's decode applies the others)."""

    def decoded_bytes(self, target_size: int) -> int:
        """Bytes of the array OpenCV will decode (JPEGs: at the reduced scale, 3 channels)."""
        if self.format == "jpeg":
            d = jpeg_scale_denominator(self.width, self.height, target_size)
            return -(-self.width // d) * -(-self.height // d) * 3
        return self.width * self.height * self.channels * self.bytes_per_sample


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png', 'bmp' or 'tiff' from the leading bytes; None if none of them."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


_SWAP_ROWS = 256
_IN_PLACE_FROM_BYTES = 16 * 1024 * 1024
"""Smaller images are converted by OpenCV into a new array (6x faster than the swap)."""
_EXIF_ORIENTATION = 0x0112
_FAST_JPEG_COLORSPACES = ("YCbCr", "Gray")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
"""PNG colour type -> channels OpenCV decodes (IMREAD_UNCHANGED expands a palette and
gray+alpha to BGRA at most)."""


def read_header(data: bytes, fmt: str) -> ImageHeader:
    """The image header alone (Pillow's lazy open; PNG's IHDR directly)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = (int(v) for v in im.size)
            channels, sample = max(3 if im.mode == "P" else 1, len(im.getbands())), 1
            orientation = 1
            if fmt == "jpeg" and "exif" in im.info:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
            if fmt == "tiff":
                tags = im.tag_v2  # type: ignore[attr-defined]
                bits = tags.get(258, (8,))
                bits = max(bits) if isinstance(bits, tuple) else int(bits)
                sample = max(1, -(-int(bits) // 8))
                channels = max(channels, int(tags.get(277, 1)))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as exc:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"unreadable image header: {exc}") from exc
    if fmt == "png" and len(data) >= 26 and data[12:16] == b"IHDR":
        sample = 2 if data[24] == 16 else 1
        channels = _PNG_CHANNELS.get(data[25], 4)
    return ImageHeader(fmt, width, height, channels, sample, orientation)


def check_payload(data: bytes, limits: ImageLimits, target_size: int = 299) -> ImageHeader:
    """Validate size, format, header dimensions and the decoded array's size."""
    if len(data) == 0:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, "empty payload")
    if len(data) > limits.max_bytes:
        raise ImageError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"payload is {len(data)} bytes, over the {limits.max_bytes}-byte limit",
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            ErrorCode.UNSUPPORTED_FORMAT, "not a JPEG, PNG, BMP or TIFF image (unknown signature)"
        )
    head = read_header(data, fmt)
    width, height = head.width, head.height
    if width <= 0 or height <= 0:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"header gives size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{width}x{height} is {width * height} pixels, over the {limits.max_pixels} limit",
        )
    decoded = head.decoded_bytes(target_size)
    if decoded > limits.max_decoded_bytes:
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{width}x{height} with {head.channels} channel(s) of {8 * head.bytes_per_sample} "
            f"bits decodes to {decoded} bytes, over the {limits.max_decoded_bytes}-byte limit",
        )
    return head


def decode_image(data: bytes, limits: ImageLimits, target_size: int = 299) -> np.ndarray:
    """Decode a payload to an RGB uint8 array of shape (H, W, 3); ImageError if it cannot."""
    return decode(data, limits, target_size)[0]


def decode(
    data: bytes, limits: ImageLimits, target_size: int = 299
) -> tuple[np.ndarray, ImageHeader]:
    """decode_image, and the header it read (the image's own size: a large JPEG is
    decoded at a reduced scale)."""
    head = check_payload(data, limits, target_size)
    return _decode(data, head, limits, target_size), head


def _decode(data: bytes, head: ImageHeader, limits: ImageLimits, target_size: int) -> np.ndarray:
    fmt, width, height = head.format, head.width, head.height
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg":
        denom = jpeg_scale_denominator(width, height, target_size)
        if head.orientation == 1:
            rgb = _decode_jpeg_rgb(data, width, height, denom)
            if rgb is not None:
                return rgb
        # OpenCV's path (it decodes what is left of a truncated file): refuse those first.
        if _jpeg_truncated(data):
            raise ImageError(ErrorCode.UNDECODABLE_IMAGE, "truncated JPEG (no end-of-image marker)")
        flags = _JPEG_REDUCED[denom] if denom > 1 else cv2.IMREAD_COLOR
        img = cv2.imdecode(buf, flags)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"corrupt or truncated {fmt.upper()} data")
    if img.nbytes > limits.max_decoded_bytes:  # the header understated it
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"decoded to {img.nbytes} bytes, over the {limits.max_decoded_bytes}-byte limit",
        )
    return to_rgb8(img)


def _decode_jpeg_rgb(data: bytes, width: int, height: int, denom: int) -> np.ndarray | None:
    """libjpeg-turbo (simplejpeg) straight to RGB at 1/denom scale, or None for a file
    OpenCV should decode: not YCbCr or grayscale (CMYK and YCCK are converted to RGB by
    each library its own way), or not decodable without a warning (corrupt, truncated)."""
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in _FAST_JPEG_COLORSPACES:
            return None
        rgb = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=-(-height // denom),
            min_width=-(-width // denom),
            min_factor=denom,
            strict=True,
        )
    except (ValueError, RuntimeError):
        return None
    return np.asarray(rgb)


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (BGR/BGRA/gray, 8/16-bit or float) -> contiguous RGB uint8.

    Peak memory stays below 1.5x the decoded array: the 8-bit copy of a 16-bit or
    float image replaces it, and a large BGR image is turned into RGB in place."""
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
    elif img.dtype in (np.float32, np.float64):
        np.clip(img, 0.0, 1.0, out=img)
        img *= 255.0
        img += 0.5
        img = img.astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(ErrorCode.UNSUPPORTED_FORMAT, f"unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        if img.nbytes <= _IN_PLACE_FROM_BYTES:
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        # In place, a band of rows at a time (cv2.cvtColor would clone the whole image).
        img = np.ascontiguousarray(img)
        for top in range(0, img.shape[0], _SWAP_ROWS):
            band = img[top : top + _SWAP_ROWS]
            blue = band[:, :, 0].copy()
            band[:, :, 0] = band[:, :, 2]
            band[:, :, 2] = blue
        return img
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageError(ErrorCode.UNSUPPORTED_FORMAT, f"unsupported channel count {channels}")


def _jpeg_truncated(data: bytes) -> bool:
    """True when the last scan (SOS marker) is not followed by an end-of-image marker.

    Inside entropy-coded data 0xFF is always stuffed, so FFD9/FFDA appear only as
    markers; an EXIF thumbnail's own EOI comes before the main image's SOS.
    """
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
