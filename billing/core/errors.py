"""Errors that end a command with a one-line message and exit status 2."""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing setting, an unreachable server.

    The CLI prints ``str(error)`` on one line and exits with status 2; it never shows a traceback.
    """


class ConfigError(UserError):
    """A missing or malformed setting, or a server named by a setting that does not answer."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


class MigrationError(UserError):
    """A migration cannot be applied (for example, it was edited after it was applied)."""
