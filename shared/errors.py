"""The project's exception tree. Every package raises subclasses of CellwatchError
at its boundaries; CLIs turn them into one clear line and a non-zero exit."""


class CellwatchError(Exception):
    """Base class of every error cellwatch raises on purpose."""

    exit_code = 2
    """What a CLI exits with for it (shared.cli.friendly_errors)."""


class ConfigError(CellwatchError):
    """A configuration file or setting is invalid (message names the field)."""


class TopicError(CellwatchError, ValueError):
    """A topic or a topic segment ({source}, {node_id}) is not valid."""


class BundleError(CellwatchError):
    """A model bundle is malformed, tampered with, or not trusted."""


class SignatureError(BundleError):
    """The bundle's Ed25519 signature is missing or not from a trusted key."""


class MqttError(CellwatchError):
    """The broker refused or dropped us (message carries the reason)."""
