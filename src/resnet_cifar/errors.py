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


class MissingExtraError(UserError):
    """A feature needs an optional dependency group (``pip install 'resnet-cifar[<extra>]'``)."""


def require_extra(modules: tuple[str, ...], extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if any of ``modules`` cannot be imported."""
    from importlib import import_module

    def absent(module: str) -> bool:
        try:
            import_module(module)
        except ImportError:  # not installed, or a broken install
            return True
        return False

    missing = [m for m in modules if absent(m)]
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(missing)}, which is not installed: pip install 'resnet-cifar[{extra}]'"
        )
