"""Image payload -> RGB 8-bit array, refusing bad input before it costs anything.

Order of checks: payload size, format signature (JPEG, PNG, BMP, TIFF), pixel count
from the header (Pillow reads only the header), then the OpenCV decode. 16-bit and
float images are scaled to 8-bit, grayscale and RGBA become RGB. Large JPEGs are
decoded at a reduced scale (libjpeg's DCT scaling), the rule in
`preprocess.jpeg_scale_denominator`, which training applies too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from cellwatch.node.preprocess import jpeg_scale_denominator
from cellwatch.shared.errors import CellwatchError
from cellwatch.shared.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from cellwatch.shared.schemas import ErrorCode

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


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png', 'bmp' or 'tiff' from the leading bytes; None if none of them."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"unreadable image header: {exc}") from exc
    return int(width), int(height)


def check_payload(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """Validate size, format and header dimensions; returns (format, width, height)."""
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
    width, height = header_size(data)
    if width <= 0 or height <= 0:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"header gives size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{width}x{height} is {width * height} pixels, over the {limits.max_pixels} limit",
        )
    if fmt == "jpeg" and _jpeg_truncated(data):
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, "truncated JPEG (no end-of-image marker)")
    return fmt, width, height


def decode_image(data: bytes, limits: ImageLimits, target_size: int = 299) -> np.ndarray:
    """Decode a payload to an RGB uint8 array of shape (H, W, 3); ImageError if it cannot."""
    fmt, width, height = check_payload(data, limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg":
        denom = jpeg_scale_denominator(width, height, target_size)
        flags = _JPEG_REDUCED[denom] if denom > 1 else cv2.IMREAD_COLOR
        img = cv2.imdecode(buf, flags)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(ErrorCode.UNDECODABLE_IMAGE, f"corrupt or truncated {fmt.upper()} data")
    return to_rgb8(img)


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (BGR/BGRA/gray, 8/16-bit or float) -> contiguous RGB uint8."""
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
    elif img.dtype in (np.float32, np.float64):
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
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
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise ImageError(ErrorCode.UNSUPPORTED_FORMAT, f"unsupported channel count {channels}")


def _jpeg_truncated(data: bytes) -> bool:
    """True when the last scan (SOS marker) is not followed by an end-of-image marker.

    Inside entropy-coded data 0xFF is always stuffed, so FFD9/FFDA appear only as
    markers; an EXIF thumbnail's own EOI comes before the main image's SOS.
    """
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
