"""Which exceptions are the user's to fix (one line, exit 2) and how to say them."""

from __future__ import annotations

import errno

from hardneg.pipeline.config import ConfigError
from hardneg.pipeline.store import LockedError
from hardneg.stages.base import InputError
from hardneg.stages.models import ModelLoadError


def user_error_message(err: BaseException) -> str | None:
    # typer vendors its own click: recognise its usage errors by shape, not by class.
    if type(err).__name__ == "Abort":
        return "aborted"
    if hasattr(err, "format_message") and hasattr(err, "exit_code"):
        return err.format_message()
    if isinstance(err, (ConfigError, ModelLoadError, LockedError, InputError)):
        return str(err)
    if isinstance(err, OSError):
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
