"""How every command-line entry point reports bad input: one line, non-zero exit."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from anomaly.errors import UserError

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
PACKAGE_DIR = str(Path(__file__).resolve().parent)
_plain_format = warnings.formatwarning


def format_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings as one ``warning: <message>`` line; others as Python shows them."""
    if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        return f"warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind ``error`` (argument parsing and loader workers wrap it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def user_message(error: UserError) -> str:
    """The one-line message, also when a loader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


def run_command(command: Callable[[], int], on_interrupt: str = "stopped") -> int:
    """Run ``command``; a UserError anywhere behind a failure becomes ``error: <one line>`` and exit 2.

    Any other exception is a bug and keeps its traceback. The package's warnings print as one line.
    """
    warnings.formatwarning = format_warning
    try:
        return command()
    except KeyboardInterrupt:
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_message(user_error)}", file=sys.stderr)
        return USER_ERROR_EXIT
