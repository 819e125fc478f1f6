"""User-facing errors: one line that names the problem and the fix."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths); printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


class DataError(UserError, ValueError):
    """Input data is missing, unreadable or malformed."""
