"""Conversion errors: one line naming the problem and the fix (printed by the CLI without traceback)."""
from __future__ import annotations

from ..errors import UserError


class ConvertError(UserError, ValueError):
    """The input cannot be converted (unsupported architecture or feature, mismatched files, bad output path)."""


class ConvertInputMissing(UserError, FileNotFoundError):
    """An input directory or file does not exist."""
