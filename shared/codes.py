"""Every error-code family on the wire, one enum each (DESIGN.md, Messages).

- `ErrorCode`: why a Result is an error (`Result.error.code`).
- `ModelErrorCode`: why a node does not serve the bundle it should
  (`NodeStatus.model_error.code`).
- `UpdateErrorCode`: why a model update, or loading a shadow candidate, failed
  (`UpdateReport.error.code`, `ShadowReport.error.code`, and the rollout's per-node
  error); a superset of `ModelErrorCode`.
- `ApiErrorCode`: why the hub refused an operator's API call, a fetch request or an
  HTTP request (`ApiReply.error.code`).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    UNDECODABLE_IMAGE = "undecodable_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    IMAGE_TOO_LARGE = "image_too_large"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EXPIRED = "expired"
    NO_MODEL = "no_model"
    INVALID_REQUEST = "invalid_request"
    DEVICE_ERROR = "device_error"
    """The inference device failed or did not finish in time; sending again may work."""
    POISON_IMAGE = "poison_image"
    """The image was being processed during two crashes of this node: refused."""
    INTERNAL = "internal"


class ModelErrorCode(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    """Not signed by a key the node trusts (e.g. its signer's key was removed)."""
    HASH_MISMATCH = "hash_mismatch"
    """A file is missing, damaged or not the one the manifest names."""
    COMPILE_ERROR = "compile_error"
    """OpenVINO could not read or compile it on this node's device."""
    SELF_TEST_FAILED = "self_test_failed"
    """Its golden vectors gave other probabilities on this device."""
    REVOKED = "revoked"
    """The hub revoked it (`cellwatch-hub models revoke`)."""
    INTERNAL = "internal"


class UpdateErrorCode(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    HASH_MISMATCH = "hash_mismatch"
    COMPILE_ERROR = "compile_error"
    SELF_TEST_FAILED = "self_test_failed"
    REVOKED = "revoked"
    FETCH_FAILED = "fetch_failed"
    """The download failed or made no progress for `updates.stall_timeout_s`."""
    DISK_FULL = "disk_full"
    """The node's store has no room for the bundle."""
    TIMED_OUT = "timed_out"
    """Set by the hub: the node was not active within the rollout's node_timeout_s."""
    INSUFFICIENT_MEMORY = "insufficient_memory"
    """Shadow phase: the node has too little free memory to hold the candidate beside its
    serving model (`shadow.min_free_mb`); it refuses, and keeps serving."""
    INCOMPATIBLE = "incompatible"
    """Shadow phase: the candidate's labels or input differ from the serving model's, so
    their answers to one preprocessed image cannot be compared."""
    INTERNAL = "internal"


def as_update_error(code: ModelErrorCode) -> UpdateErrorCode:
    """The update error for a model error (every ModelErrorCode is an UpdateErrorCode)."""
    return UpdateErrorCode(code.value)


class ApiErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_VERB = "unknown_verb"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    """The verb does not apply now (e.g. a second rollout on the same nodes)."""
    INVALID_BUNDLE = "invalid_bundle"
    TOO_LARGE = "too_large"
    BAD_OFFSET = "bad_offset"
    UNTRAINED_MODEL = "untrained_model"
    """rollout.start of a model with any flag (synthetic, untrained, ...) without yes_untrained."""
    REVOKED = "revoked"
    """rollout.start of a revoked model, or a fetch request for one of its files."""
    UNKNOWN_BUNDLE = "unknown_bundle"
    """A fetch request for a bundle the hub does not have."""
    UNKNOWN_FILE = "unknown_file"
    """A fetch request for a file the bundle does not have."""
    BAD_SIGNATURE = "bad_signature"
    """A revocation not signed by a key the hub trusts."""
    NOT_READY = "not_ready"
    """A fetch request a site relay cannot answer yet (the file is still on its way to
    it): the downloader asks again at once (shared/rpc/transfer.py)."""
    UNAVAILABLE = "unavailable"
    """A fetch request a site relay cannot serve (e.g. its disk is full)."""
    QUOTA = "quota"
    """A field sample the hub's samples store has no room for (its quota): try later."""
    INTERNAL = "internal"
