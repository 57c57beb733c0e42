"""How every command-line entry point reports bad input: one line, non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from anomaly.errors import UserError

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


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

    Any other exception is a bug and keeps its traceback.
    """
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
