"""Exception types. Every error a user can trigger names the file or value at fault."""

from __future__ import annotations


class DistacError(Exception):
    """Base class for all errors distac raises on purpose (bad input, bad config)."""


class CheckpointError(DistacError):
    """A checkpoint file or directory cannot be read, is corrupt, or does not fit the others."""


class DataError(DistacError):
    """A dataset is missing, empty, malformed, or its labels do not fit the model head."""


class ConfigError(DistacError, ValueError):
    """A configuration value is unknown or out of range."""
