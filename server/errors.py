"""Errors that the admin CLI turns into exit codes (sysexits.h)."""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class ServerError(Exception):
    """An operator-facing failure with a clear message and an exit code."""

    exit_code = 1


class UsageError(ServerError):
    exit_code = EX_USAGE


class DataError(ServerError):
    exit_code = EX_DATAERR


class NotFound(ServerError):
    exit_code = EX_DATAERR


class Conflict(ServerError):
    exit_code = EX_DATAERR


class ConfigError(ServerError):
    exit_code = EX_CONFIG


class WrongMasterKey(ConfigError):
    """The master key given is not the one the data directory's keys are sealed with."""


class Unavailable(ServerError):
    """serve cannot listen on an address: in use, not this machine's, or not permitted."""

    exit_code = EX_UNAVAILABLE


class DatabaseUnavailable(ServerError):
    """The database cannot be reached or cannot write now (down, read-only, failing over).
    A request meets it as 503 with Retry-After and no key; the next request tries again."""

    exit_code = EX_UNAVAILABLE


class StaleMasterKey(ServerError):
    """A value was sealed under a master key that a rotation retired meanwhile: nothing was
    written, and the same request made again seals under the new key (503, Retry-After)."""

    exit_code = EX_UNAVAILABLE


class DatabaseRefused(ServerError):
    """The database refused the server's credentials (a wrong password, an unknown role)."""

    exit_code = EX_NOPERM


class CannotCreate(ServerError):
    exit_code = EX_CANTCREAT


class NotYet(ServerError):
    """Refused for now: doing it before something else happens would harm hosts."""

    exit_code = EX_TEMPFAIL


class WriteFailed(ServerError):
    """A file could not be written in full (a full disk, an I/O error); none of it is left."""

    exit_code = EX_IOERR


class NotPermitted(ServerError):
    """Refused for who runs it: serving as root without --allow-root."""

    exit_code = EX_NOPERM


class IntegrityError(ServerError):
    """A sealed value failed authentication: tampering, a moved row or a wrong master key."""

    exit_code = EX_DATAERR
