"""Errors the node raises at its boundaries."""

from cellwatch.shared.errors import CellwatchError


class NodeError(CellwatchError):
    """Base of the node's errors."""


class DeviceError(NodeError):
    """The configured OpenVINO device is not available (message lists those present)."""


class ModelLoadError(NodeError):
    """A verified bundle could not be compiled or does not fit the manifest."""


class SelfTestError(ModelLoadError):
    """The bundle's golden self-test gave different probabilities on this device."""


class InferenceError(NodeError):
    """An inference could not be started or did not finish (a device error)."""


class ModelRetired(NodeError):
    """The model was replaced while a request waited for it: start on the new one."""
