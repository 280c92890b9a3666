"""Failures of the agent, each with the exit code (sysexits.h) the CLI reports for it.

Messages name the dataset and the reason; they never contain key material.
"""

from __future__ import annotations

EX_OK = 0
EX_PARTIAL = 1  # some encryption roots unlocked, others failed
EX_LOCKED = 3  # `status` only: a managed encryption root is locked
EX_USAGE = 64
EX_DATAERR = 65  # the server sent key material that does not fit the dataset
EX_NOINPUT = 66  # `recover`: the kit or identity file cannot be read
EX_UNAVAILABLE = 69  # zfs missing, pool or dataset not there
EX_SOFTWARE = 70
EX_CANTCREAT = 73  # `setup`: the configuration exists and --force was not given
EX_IOERR = 74  # the command's own output could not be written (a closed pipe, a full disk)
EX_TEMPFAIL = 75  # server unreachable, timed out, 5xx, 429: worth retrying later
EX_NOPERM = 77  # pin mismatch, redirect, 403: refused, retrying will not help
EX_CONFIG = 78
EX_BADKEY = 79  # zfs rejected the key ("Incorrect key provided")


class AgentError(Exception):
    exit_code = EX_SOFTWARE


class OutputFailed(AgentError):
    """The command's own output (standard output) could not be written."""

    exit_code = EX_IOERR


class AlreadyExists(AgentError):
    """A file the command would create exists, and the command was not told to replace it."""

    exit_code = EX_CANTCREAT


class ConfigError(AgentError):
    exit_code = EX_CONFIG


class UsageError(AgentError):
    exit_code = EX_USAGE


class ZfsUnavailable(AgentError):
    exit_code = EX_UNAVAILABLE


class ZfsError(AgentError):
    """A zfs or zpool command failed; carries its stderr (which never holds key bytes)."""

    exit_code = EX_UNAVAILABLE

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{command} failed (exit {returncode}): {stderr.strip() or 'no message'}")
        self.returncode = returncode
        self.stderr = stderr


class IncorrectKey(ZfsError):
    exit_code = EX_BADKEY


class KeyAlreadyLoaded(ZfsError):
    exit_code = EX_OK


class ServerUnavailable(AgentError):
    """Temporary: the key servers could not be reached or answered 5xx/429 until the deadline."""

    exit_code = EX_TEMPFAIL


class ServerRefused(AgentError):
    """Final: a pin mismatch, a redirect, or 403."""

    exit_code = EX_NOPERM


class BadKeyData(AgentError):
    exit_code = EX_DATAERR


class InputMissing(AgentError):
    """`recover`: a file named on the command line cannot be read."""

    exit_code = EX_NOINPUT


class BadKit(AgentError):
    """`recover`: the kit is damaged, truncated, of another format or version, or holds
    no key for what was asked."""

    exit_code = EX_DATAERR


class KitRefused(AgentError):
    """`recover`: the identity given does not open the kit."""

    exit_code = EX_NOPERM


class ToolMissing(AgentError):
    """`recover`: the age binary is not installed."""

    exit_code = EX_UNAVAILABLE
