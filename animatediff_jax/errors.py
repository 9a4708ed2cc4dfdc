"""The one error type for bad user input.

`ConfigError` is what a config field, a command-line argument or a user's file that cannot be used
raises: its message is the one line a command prints (exit code 2), naming what to fix. Everything
else that escapes a command is a bug and keeps its traceback. A leaf module: it imports nothing.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input (a config field, an argument, a file): the message is the one line the user sees."""


class FieldError(ConfigError):
    """A `ConfigError` about one named setting: `field` (e.g. "num_frames", "context_windows.length")
    and `problem` (what is wrong with its value). The message is `"{field}{problem}"`, so a caller that
    knows the setting by another name (a config's `L` for `num_frames`) can say it in that name
    (`renamed`)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}{problem}")

    def renamed(self, names: dict[str, str]) -> "FieldError":
        """This error with its field's head (before the first "." or "[") replaced through `names`."""
        cut = min([i for i in (self.field.find("."), self.field.find("[")) if i >= 0], default=len(self.field))
        head = self.field[:cut]
        return FieldError(names.get(head, head) + self.field[cut:], self.problem)
