"""The one exception type for bad user input.

Command-line entry points catch :class:`UserError` and print its message as a
single line (no traceback) before exiting with a non-zero status. It is a
:class:`ValueError`, so library callers may catch either.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do."""


class ArgumentsError(UserError):
    """A command-line option the parser rejects (unknown, or a value of the wrong type)."""
