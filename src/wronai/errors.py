"""User-facing errors.

Anything raised as a :class:`WronAIError` is a mistake the user can fix (a bad config value, a missing
file, an output directory that already holds a finished run). The CLI prints its message as one line per
problem and exits non-zero, without a traceback. Bugs in WronAI itself stay ordinary exceptions.
"""

from __future__ import annotations


class WronAIError(Exception):
    """A problem the user can fix; ``str(err)`` is the message shown to them."""

    exit_code = 2


class ConfigError(WronAIError):
    """One or more problems in a configuration, one line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        header = f"{len(self.problems)} problem(s){where}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


class DataError(WronAIError):
    """A data file or row that cannot be used (names the file, row and field)."""


class OutputExistsError(WronAIError):
    """The output directory already holds a finished run."""
