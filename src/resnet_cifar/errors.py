"""User-facing errors: one short, actionable line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, files, environment).

    Entry points catch it, print ``error: <message>`` and exit with status 2.
    """


class ConfigError(UserError):
    """A config value is missing, of the wrong type or out of range."""


class DataError(UserError):
    """The dataset is missing, incomplete or malformed."""


class WeightsError(UserError):
    """A checkpoint or weights file cannot be used."""


class OutputError(UserError):
    """An output (run directory, checkpoint, log) cannot be written."""
