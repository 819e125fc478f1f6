"""User-facing errors: one line that names the problem and the fix."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


class UserError(Exception):
    """Bad input from the user (config, data, paths); printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


class DataError(UserError, ValueError):
    """Input data is missing, unreadable or malformed."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or quota, or file-size limit) is full; the message says where."""


NO_SPACE_ERRNOS = frozenset({28, 122, 27})  # ENOSPC, EDQUOT, EFBIG (RLIMIT_FSIZE / filesystem file-size limit)
# what writers say when they drop the errno: Megatron's checkpoint workers pass on only the text of
# the error; torch's zip writer reports a short write as "unexpected pos N vs M" / "file write failed"
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "unexpected pos ",
                  "file write failed")


def find_disk_full(err: BaseException) -> "str | None":
    """Why ``err`` is an out-of-space failure (e.g. ``No space left on device``), or None.

    Writers wrap it: torch's DCP in a ``CheckpointException`` (per-rank ``failures``),
    Megatron and thread pools as the ``__cause__`` / ``__context__`` or the text of their own error.
    """
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskFullError):  # already explained: look at what it explains
            todo.append(e.__cause__)
            continue
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return e.strerror or str(e)
        text = str(e)
        hit = next((t for t in NO_SPACE_TEXTS if t in text), None)
        if hit is not None:
            return hit if hit[0].isupper() else "a write came up short: the disk is full or a file-size limit was hit"
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                todo += [x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)]
    return None


def reraise_disk_full(err: BaseException, doing: str, fix: str) -> None:
    """Raise ``disk full while <doing> (<reason>); <fix>`` as one :class:`DiskFullError` when ``err`` is
    out of space; return otherwise (the caller re-raises ``err``).  Call it after removing partial output."""
    reason = None if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)) else find_disk_full(err)
    if reason is not None:
        raise DiskFullError(f"disk full while {doing} ({reason}); {fix}") from err


@contextmanager
def partial_output(partial: Union[str, Path], out: Union[str, Path], doing: str, again: str) -> Iterator[None]:
    """Remove the partial output folder ``partial`` on any error; a full disk becomes one line.

    Why: merge, convert import and convert export all publish a folder by renaming it into place,
    and must leave nothing behind and say the same thing when the disk fills up.
    """
    try:
        yield
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        reraise_disk_full(err, doing, f"removed the partial output, nothing was written to {out}; free space and "
                                      f"run {again} again")
        raise
