"""How every command-line entry point reports bad input, interruption and failed writes: one line.

Exit codes: 0 success, 2 bad input, a file that cannot be read or written, or memory that
cannot be allocated (``error: <one line>``), 130 Ctrl-C and 143 SIGTERM (``interrupted: <what is kept>``).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from anomaly.errors import UserError

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED_EXIT = 143  # 128 + SIGTERM, as a job scheduler expects
PACKAGE_DIR = str(Path(__file__).resolve().parent)
_plain_format = warnings.formatwarning


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that the run cleans up as on Ctrl-C."""


def format_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings as one ``warning: <message>`` line; others as Python shows them."""
    if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        return f"warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions behind it (``raise ... from``, and those being handled)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind ``error`` (argument parsing and loader workers wrap it)."""
    return next((e for e in _causes(error) if isinstance(e, UserError)), None)


def user_message(error: UserError) -> str:
    """The one-line message, also when a loader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


#: Reasons a file cannot be read or written that are the system's or the user's, never a bug.
SYSTEM_ERRNOS = {
    errno.ENAMETOOLONG, errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
    errno.EROFS, errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EMFILE, errno.EIO,
}  # fmt: skip
#: How safetensors (Rust) words the same reasons: ``I/O error: File too large (os error 27)``.
RUST_OS_ERROR = re.compile(r"(?:os error |Os \{ code: )(\d+)")


def system_error_message(error: BaseException) -> str | None:
    """``cannot read or write <file>: <reason>`` for an OSError (or safetensors' one) behind ``error``."""
    for cause in _causes(error):
        code, name = None, None
        if isinstance(cause, OSError):
            code, name = cause.errno, cause.filename
        elif type(cause).__name__ == "SafetensorError":
            found = RUST_OS_ERROR.search(str(cause))
            code = int(found.group(1)) if found else None
        if code in (errno.EEXIST, errno.ENOTDIR) and name is not None and Path(name).is_file():
            return f"{name} is a file, not a folder: give a path in a folder"
        if code in SYSTEM_ERRNOS:
            where = f" {name}" if name is not None else ""
            shown = where if len(where) <= 120 else f" {str(name)[:60]}...{str(name)[-40:]}"
            return f"cannot read or write{shown}: {os.strerror(code)}"
    return None


#: How PyTorch and the allocators word an allocation that failed (CPU and CUDA).
OUT_OF_MEMORY = re.compile(r"not enough memory|out of memory|can't allocate memory|failed to allocate", re.I)
MEMORY_HINT = "lower the batch size (anomaly fit: --data.batch_size; anomaly predict: --batch-size)"


def memory_error_message(error: BaseException) -> str | None:
    """``out of memory (<what failed>): lower the batch size ...`` for an allocation behind ``error``."""
    for cause in _causes(error):
        text = str(cause).strip()
        failed = isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError"
        if failed or (isinstance(cause, RuntimeError) and OUT_OF_MEMORY.search(text)):
            line = next((part for part in text.splitlines() if OUT_OF_MEMORY.search(part)), text)
            what = line.split("] ", 1)[-1].strip()[:160] or type(cause).__name__
            return f"out of memory ({what}): {MEMORY_HINT}"
    return None


def interrupted_exit(error: BaseException) -> int | None:
    """130 for Ctrl-C, 143 for SIGTERM, also when Lightning turned them into ``sys.exit``; else None."""
    if isinstance(error, Terminated) or type(error).__name__ == "SIGTERMException":
        return TERMINATED_EXIT
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT
    if isinstance(error, SystemExit):  # Lightning: sys.exit(1) while handling KeyboardInterrupt
        for cause in _causes(error.__context__):
            found = interrupted_exit(cause)
            if found is not None:
                return found
    return None


#: Exit codes of the interrupts received while a command runs (see :func:`signals_raise`).
_received: list[int] = []


def _on_signal(signum, frame) -> None:
    _received.append(INTERRUPTED_EXIT if signum == signal.SIGINT else TERMINATED_EXIT)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def raise_if_interrupted() -> None:
    """Raise an interrupt that arrived but was swallowed on its way (e.g. inside a finaliser that
    ignores exceptions, such as a data loader's shutdown), so that the run still stops and cleans up."""
    if _received:
        raise KeyboardInterrupt if _received[0] == INTERRUPTED_EXIT else Terminated


def _quiet_interrupts(previous: Callable) -> Callable:
    """An ``sys.unraisablehook`` that drops the (recorded) interrupts a finaliser could not raise, and,
    once an interrupt arrived, what finalisers fail on in its aftermath (a data loader interrupted
    while it started its workers fails in ``__del__`` when collected, even at exit)."""

    def hook(unraisable) -> None:
        if not (_received or isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated))):
            previous(unraisable)

    return hook


@contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated` in the main thread
    (Lightning chains to it), and both are recorded: one swallowed on its way still ends the command
    as an interrupt (:func:`raise_if_interrupted`, :func:`received_interrupt`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _commands_running
    _received.clear()
    previous = {number: signal.signal(number, _on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_interrupts(sys.unraisablehook)
    _commands_running += 1
    try:
        yield
    finally:
        _commands_running -= 1
        for number, handler in previous.items():
            signal.signal(number, handler)  # also undoes Lightning's SIG_IGN after a Ctrl-C
        if not _received:  # after an interrupt, the quiet hook stays for the objects collected later
            sys.unraisablehook = previous_hook


def received_interrupt() -> int | None:
    """130 or 143 when an interrupt arrived during the current command, else None."""
    return _received[0] if _received else None


def ignore_interrupts(worker_id: int = 0) -> None:
    """A data loader worker's ``worker_init_fn``: Ctrl-C, which a terminal sends to every process of
    the group, is the main process's to handle (it stops the workers); SIGTERM ends a worker quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _forked_child_ignores_interrupts() -> None:
    """A process forked while a command runs (a loader worker) ignores Ctrl-C from its first moment,
    before its ``worker_init_fn`` runs."""
    if _commands_running:
        ignore_interrupts()


#: How many commands run in :func:`signals_raise` in this process (forks inherit it).
_commands_running = 0
os.register_at_fork(after_in_child=_forked_child_ignores_interrupts)


def run_command(command: Callable[[], int], on_interrupt: str = "stopped") -> int:
    """Run ``command``; a UserError anywhere behind a failure becomes ``error: <one line>`` and exit 2.

    A file that cannot be read or written (name too long, disk or ``ulimit -f`` full,
    no permission) is one ``error:`` line too, and so is an allocation that fails (with the
    hint to lower the batch size). Ctrl-C exits 130 and SIGTERM 143, each
    with an ``interrupted:`` line. Any other exception is a bug and keeps its
    traceback, unless an interrupt arrived: then it is what broke on the interrupt's way out (a
    loader's teardown, a worker that stopped), and the command ends as interrupted. The package's
    warnings print as one line.
    """
    warnings.formatwarning = format_warning
    try:
        with signals_raise():
            code = command()
            swallowed = received_interrupt()
        if swallowed is None:
            return code
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        return swallowed
    except (KeyboardInterrupt, Terminated, SystemExit) as error:
        code = interrupted_exit(error)
        if code is None:
            raise
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        return code
    except Exception as error:
        interrupted = received_interrupt()
        if interrupted is not None:  # what failed on the interrupt's way out (e.g. a loader's teardown)
            print(f"interrupted: {on_interrupt}", file=sys.stderr)
            return interrupted
        user_error = find_user_error(error)
        if user_error is not None:
            print(f"error: {user_message(user_error)}", file=sys.stderr)
            return USER_ERROR_EXIT
        system = system_error_message(error) or memory_error_message(error)
        if system is None:
            raise
        print(f"error: {system}", file=sys.stderr)
        return USER_ERROR_EXIT
