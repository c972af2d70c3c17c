"""Error types. Every message names the problem and the fix."""
from __future__ import annotations


class QcoreError(Exception):
    """Base class of qcore's user-facing errors (the CLI prints them as one line)."""


class UnknownMethodError(QcoreError, KeyError):
    """A method name that no loaded plugin registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginLoadError(QcoreError):
    """A plugin that failed to import or register."""


class ConfigError(QcoreError, ValueError):
    """An unknown or invalid option."""


class CompatibilityError(QcoreError, ValueError):
    """A method cannot run on this model with these options."""


class CalibrationError(QcoreError, ValueError):
    """Missing or insufficient calibration data."""


class NonFiniteError(CalibrationError):
    """NaN or infinite values in a model's weights, its activations on the calibration text, a
    statistic gathered from them, a quantization result or an evaluation loss."""


class CheckpointError(QcoreError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, foreign or unsafe."""


class ArchitectureError(QcoreError, ValueError):
    """A model whose structure qcore cannot introspect."""
