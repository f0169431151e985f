"""Every error type of hardneg, and which of them are the user's to fix (one line, exit 2).

A leaf module: it imports nothing of hardneg, so stages and pipeline modules alike can raise
these types without an import circle. The modules that used to define them re-export them
(`from hardneg.pipeline.config import ConfigError` still works).
"""

from __future__ import annotations

import errno
import signal


class UserError(Exception):
    """Something the user can fix: `hardneg` prints `hardneg: error: <message>` and exits 2."""


class ConfigError(UserError, ValueError):
    """A configuration problem (unknown key, wrong type, conflicting or impossible settings)."""


class InputError(UserError, ValueError):
    """An input that cannot be read at all (as opposed to a bad row, which becomes a reject)."""


class ModelLoadError(UserError, ValueError):
    """A model that cannot be found or loaded."""


class LockedError(UserError, RuntimeError):
    """Another hardneg run holds the work dir or the output."""


class EvalError(ConfigError):
    """A problem with `hardneg eval`'s inputs."""


class ReportError(ConfigError):
    """The folder given to `hardneg report` is not a hardneg output, or its BEIR folder is unusable."""


class ExportError(ConfigError):
    """A dataset `hardneg export` cannot export, or an export target it must not write."""


class PushError(UserError, RuntimeError):
    """An upload to the Hub failed; the output on disk is complete."""


class FilterSpecError(ValueError):
    """A filter spec that cannot be used (unknown type or key, value out of range); the config's
    validation turns it into one line."""


class WorkerError(RuntimeError):
    """A Ray worker failed in a way that is not the input's or the model's fault."""


class AccountingError(RuntimeError):
    """input pairs != output pairs + rejected pairs: a bug in hardneg, never the user's."""


class Interrupted(BaseException):
    """SIGTERM received (SIGINT arrives as KeyboardInterrupt). A BaseException, like
    KeyboardInterrupt, so no `except Exception` swallows it on its way out: every `finally` and
    `except BaseException` cleanup on the way runs (temp folders, locks, Ray)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted_message(signum: int) -> str:
    """The one line an interrupted run ends with (exit code 128 + signal number)."""
    name = signal.Signals(signum).name
    return (f"interrupted by {name}: the run stopped before finishing; run the same command again to resume "
            "(finished stages are reused, temp folders are cleaned by the next run)")


def user_error_message(err: BaseException) -> str | None:
    """The one line for an error the user can fix, or None for a bug (left to its traceback)."""
    # typer vendors its own click: recognise its usage errors by shape, not by class.
    if type(err).__name__ == "Abort":
        return "aborted"
    if hasattr(err, "format_message") and hasattr(err, "exit_code"):
        return err.format_message()
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return _os_error_message(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err:
        return user_error_message(cause)
    return None


def _os_error_message(err: OSError) -> str | None:
    where = err.filename or "the output"
    if err.errno == errno.ENOSPC:
        return f"no space left on device ({err.filename or 'while writing'})"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded ({err.filename or 'while writing'})"
    if err.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {where}: permission denied"
    if err.errno == errno.ENOTDIR:
        return f"cannot write {where}: a part of the path is a file, not a folder"
    if err.errno in (errno.EEXIST, errno.EISDIR):
        return f"cannot write {where}: something else is in the way"
    if isinstance(err, FileNotFoundError):
        return f"file not found: {err.filename}"
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err:
        return user_error_message(cause)
    return None
