"""Errors of snatgw, and the exit codes the CLI maps them to (one table, here)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_NO_MATCH = 1  # `explain`: no rule matched
EXIT_BAD_INPUT = 2  # bad arguments or config (as ipvsadm exits 2)
EXIT_BACKEND = 3  # the datapath could not be set up
EXIT_DAEMON = 4  # the daemon is not running or refused the request


class SnatgwError(Exception):
    """Base of every error snatgw reports to an operator."""

    exit_code = EXIT_BAD_INPUT


class RuleError(SnatgwError):
    """A rule is invalid.  ``field`` names the offending field (config keyword)."""

    def __init__(self, message: str, field: str | None = None, where: str | None = None):
        self.message = message
        self.field = field
        self.where = where  # "file:line" when known
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        return ": ".join(parts + [self.message])


class ConfigError(RuleError):
    """The config text is invalid; carries file:line and field."""


class BackendError(SnatgwError):
    exit_code = EXIT_BACKEND


class MissingDeviceError(BackendError):
    """An `inside`/`outside` interface is not in this network namespace (``name``)."""

    def __init__(self, name: str, message: str | None = None):
        self.name = name
        super().__init__(message or f"interface {name!r} does not exist (in this network namespace)")


class DaemonError(SnatgwError):
    exit_code = EXIT_DAEMON
