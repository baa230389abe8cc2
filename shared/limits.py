"""Size limits and defaults that more than one part relies on (one place for each)."""

MiB = 1024 * 1024

MAX_IMAGE_BYTES = 20 * MiB
"""Default largest image payload a node accepts (DESIGN.md, Security)."""

MAX_IMAGE_PIXELS = 50_000_000
"""Default largest decoded image, checked from the header before decoding."""

MAX_DECODED_BYTES = 256 * MiB
"""Default largest decoded image array (width x height x channels x bytes per sample,
from the header): 50 MP of 8-bit RGBA fits, 50 MP of 16-bit RGBA (400 MB) does not."""

MAX_MANIFEST_BYTES = 1 * MiB
"""A manifest.json larger than this is refused without parsing."""

MAX_BUNDLE_FILE_BYTES = 2048 * MiB
"""Largest single file a bundle may list (model.bin of a big model)."""

MAX_GOLDEN_BYTES = 64 * MiB

FETCH_CHUNK_BYTES = 256 * 1024
"""Default chunk size for bundle transfers (hub -> node)."""

MAX_FETCH_CHUNK_BYTES = 4 * MiB

MAX_NODE_MESSAGE_BYTES = 16 * 1024
"""Largest node status, telemetry, update report or desired model read (a real one is
under 2 KB): larger ones are dropped unread."""

MAX_REVOCATION_BYTES = 1 * MiB
"""Largest revocation list a node reads (about 300 bytes per revoked bundle)."""

MAX_API_REQUEST_BYTES = 64 * 1024
"""The hub ignores API requests larger than this (with an error reply)."""

BROKER_MAX_PACKET_BYTES = MAX_IMAGE_BYTES + 64 * 1024
"""mosquitto.conf's max_packet_size: an image plus headroom for properties."""

DEFAULT_TELEMETRY_INTERVAL_S = 10.0
"""A node's default telemetry period (and the `window_s` the hub assumes without one)."""

STALE_AFTER_INTERVALS = 3
"""An online node silent (no status, telemetry or report) for this many telemetry
intervals is shown `stale` by the hub."""

CONFLICT_HOLD_S = 600.0
"""The hub shows a node `conflict` (two processes with its node id) until this long
after the last sign of it; a node gives up after 3 takeovers in the same window."""

MAX_TELEMETRY_COUNT = 2**53
"""Largest counter (images processed, errors) a Telemetry may carry: exact as a float,
so Prometheus and JSON readers see the node's number unchanged."""

MAX_TELEMETRY_RATE = 1e6
"""Largest images/s a Telemetry may report (no node comes near it)."""

MAX_TELEMETRY_LATENCY_MS = 86_400_000.0
"""Largest latency a Telemetry may report: one day."""

MAX_TELEMETRY_INFLIGHT = 1_000_000

MAX_TELEMETRY_RSS_MB = 16_777_216.0
"""Largest resident memory a Telemetry may report: 16 TiB."""

MAX_ERROR_CODES = 32
"""Distinct error codes one Telemetry may count (bounds the hub's metric labels)."""
