"""The one error hierarchy: every user-facing failure is a SovctlError with an exit code and a hint.

The CLI catches only this class; anything else is a bug and is allowed to crash loudly.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a check ran and did not pass (verify mismatch, audit FAIL)
    USAGE = 2  # bad arguments, bad reference, bad name
    CONFIG = 3  # malformed or invalid sovctl.toml / lock / profile
    NOT_FOUND = 4  # unknown model name, missing file
    INTEGRITY = 5  # digest mismatch, not a GGUF file, tampered blob
    NETWORK = 6  # offline, unreachable endpoint, HTTP failure
    RUNTIME = 7  # a process did not start, stack not running, port busy
    ISOLATION = 8  # namespaces not permitted for the audit
    BUSY = 9  # another sovctl holds the lock


class SovctlError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(SovctlError):
    exit_code = ExitCode.USAGE


class ConfigError(SovctlError):
    exit_code = ExitCode.CONFIG


class NotFoundError(SovctlError):
    exit_code = ExitCode.NOT_FOUND


class IntegrityError(SovctlError):
    exit_code = ExitCode.INTEGRITY


class NetworkError(SovctlError):
    exit_code = ExitCode.NETWORK


class RuntimeStartError(SovctlError):
    exit_code = ExitCode.RUNTIME


class IsolationError(SovctlError):
    exit_code = ExitCode.ISOLATION


class BusyError(SovctlError):
    exit_code = ExitCode.BUSY


class CheckFailed(SovctlError):
    """A command whose result is a set of checks ran fine, but not every check passed."""

    exit_code = ExitCode.FAILURE
