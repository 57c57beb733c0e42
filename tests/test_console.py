"""How entry points end: exit codes for interruptions, one line for a file the system will not write."""

from __future__ import annotations

import errno

import pytest
import torch

from anomaly.console import (
    INTERRUPTED_EXIT,
    TERMINATED_EXIT,
    interrupted_exit,
    memory_error_message,
    run_command,
    system_error_message,
)


class SafetensorError(Exception):
    """Stands in for safetensors' Rust error, matched by name."""


def lightning_exit_after(error: BaseException) -> SystemExit:
    """What Lightning does on Ctrl-C: ``sys.exit(1)`` while handling the KeyboardInterrupt."""
    try:
        raise error
    except BaseException:
        try:
            raise SystemExit(1)
        except SystemExit as exit_:
            return exit_


class SIGTERMException(SystemExit):
    """Stands in for Lightning's: a SystemExit with no code (which exits 0)."""


def test_interruptions_have_their_shell_exit_codes():
    assert interrupted_exit(KeyboardInterrupt()) == INTERRUPTED_EXIT == 130
    assert interrupted_exit(lightning_exit_after(KeyboardInterrupt())) == 130
    assert interrupted_exit(SIGTERMException()) == TERMINATED_EXIT == 143
    assert interrupted_exit(SystemExit(2)) is None  # argparse's own exit stays as it is


CANNOT = "cannot read or write"
RUST_EFBIG = "Error while serializing: I/O error: File too large (os error 27)"


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            OSError(errno.EFBIG, "File too large", "run/scores.csv"),
            f"{CANNOT} run/scores.csv: File too large",
        ),
        (SafetensorError(RUST_EFBIG), f"{CANNOT}: File too large"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300), f"{CANNOT} {'x' * 60}..."),
        (OSError(errno.ENOSPC, "No space left on device"), f"{CANNOT}: No space left on device"),
    ],
)
def test_a_file_the_system_will_not_write_is_one_line(error, message, capsys):
    """Bug 11: ``ulimit -f`` gave SafetensorError and OSError tracebacks."""
    assert system_error_message(error).startswith(message)

    def fail() -> int:
        raise error

    assert run_command(fail) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_bug_keeps_its_traceback():
    def fail() -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file", "internal.bin")  # not the user's doing

    with pytest.raises(FileNotFoundError):
        run_command(fail)


def test_an_allocation_that_fails_is_one_line_with_the_batch_size_hint(capsys):
    def allocate() -> int:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: refused at once by the allocator
        return 0

    assert run_command(allocate) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line.startswith("error: out of memory (") and "you tried to allocate 1125899906842624 bytes" in line
    )
    assert line.endswith(
        "lower the batch size (anomaly fit: --data.batch_size; anomaly predict: --batch-size)"
    )
    assert memory_error_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"))

    def bug() -> int:
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError):
        run_command(bug)
