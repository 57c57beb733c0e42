"""Every fenced `anomaly ...` command in README.md and docs/*.md runs, or at least parses.

* the demo's commands run for real, in order, in one scratch folder: ``anomaly fit`` itself, and
  every command whose ``runs/...`` paths that demo run has written (predict, export, evaluate);
* any other ``anomaly fit`` is checked with ``--print_config`` (every option and config parsed,
  nothing fitted), ``anomaly reproduce`` with ``--dry-run`` on a stand-in for ``/data/mvtec_ad``;
* the other subcommands' options go through their own parser, and stop there, as do the options
  of ``python <script>.py`` commands (``benchmarks/...``), through the script's parser.

A page added to docs/ is covered as soon as it exists; relative links must point at files.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from anomaly.commands import main
from anomaly.data import MVTEC_CATEGORIES
from anomaly.data.demo import cache_dir
from tests.conftest import FEW_HELD_OUT

pytestmark = FEW_HELD_OUT

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
SHELL_SEPARATORS = ("&&", "||", ";", "|")
REDIRECTIONS = (">", ">>", "2>", "2>&1", "<")
MVTEC_ROOT = "/data/mvtec_ad"  # the docs' name for an MVTec AD download
GOOD_IMAGES = "/path/to/good_images"  # the docs' name for a folder of good images
DEMO_CACHE = "~/.cache/anomaly"  # the demo data's default location
# Shell variables of the docs' loops and job scripts, with one example value each.
EXAMPLE_VARIABLES = {"fold": "0", "rule": "linear", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    argv: tuple[str, ...]  # without the leading "anomaly" (or, for a script, the interpreter)
    program: str = "anomaly"  # or "python": then argv[0] is the script, relative to the clone

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def logical_lines(text: str):
    """(line number, line) of the shell fences, continuation lines joined."""
    fence, pending, start = None, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def program_of(segment: list[str]) -> str | None:
    """``anomaly``, ``python`` for a script of the clone run by any Python interpreter, else None."""
    if segment and segment[0] == "anomaly":
        return "anomaly"
    interpreter = bool(segment) and re.fullmatch(r"python3?", Path(segment[0]).name) is not None
    if interpreter and len(segment) > 1 and segment[1].endswith(".py") and (REPO / segment[1]).is_file():
        return "python"
    return None


def commands_of(page: Path) -> list[Command]:
    found = []
    for number, line in logical_lines(page.read_text()):
        for name, value in EXAMPLE_VARIABLES.items():
            line = line.replace(f"${name}", value)
        tokens = shlex.split(line.removeprefix("$ "), comments=True)
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token in SHELL_SEPARATORS:
                program = program_of(segment)
                if program:
                    argv = segment[1:]
                    cut = next((at for at, t in enumerate(argv) if t in REDIRECTIONS), len(argv))
                    name = page.relative_to(REPO).as_posix()
                    found.append(Command(name, number, tuple(argv[:cut]), program))
                segment = []
            else:
                segment.append(token)
    return found


DOCUMENTED = [command for page in PAGES for command in commands_of(page)]
COMMANDS = [command for command in DOCUMENTED if command.program == "anomaly"]
SCRIPTS = [command for command in DOCUMENTED if command.program == "python"]


def test_the_readme_and_the_docs_hold_commands():
    pages = {command.page for command in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/own-data.md", "docs/reproduction.md"} <= pages
    assert ("fit",) in [c.argv for c in COMMANDS if c.page == "README.md"]  # the demo
    assert {"benchmarks/compare_peers.py", "benchmarks/run.py"} <= {c.argv[0] for c in SCRIPTS}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_page_names_a_path_of_one_machine(page: Path):
    """Data and environments are arguments (``/data/mvtec_ad`` stands for wherever they are)."""
    for line in page.read_text().splitlines():
        assert not re.search(r"\.\./shared|/opt/|/work/|/home/\w", line), f"{page.name}: {line}"


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_at_files(page: Path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name} links to missing {target}"


class Parsed(Exception):
    """Raised once a subcommand's parser has accepted the arguments: nothing is run."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch folder with stand-ins: an MVTec AD root (empty category folders), good images."""
    folder = tmp_path_factory.mktemp("docs")
    for category in MVTEC_CATEGORIES:
        for split in ("train/good", "test/good"):
            (folder / "mvtec_ad" / category / split).mkdir(parents=True)
    (folder / "good_images").mkdir()
    Image.new("RGB", (32, 32), "grey").save(folder / "good_images" / "000.png")
    return folder


@pytest.fixture(scope="module")
def demo_run(workspace: Path):
    """The README's demo, `anomaly fit`, run once in the workspace."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        assert main(["fit"]) == 0
    return workspace


def concrete(argv: tuple[str, ...], workspace: Path) -> list[str]:
    """The stand-ins for the docs' placeholders."""
    out = []
    for token in argv:
        token = token.replace(MVTEC_ROOT, str(workspace / "mvtec_ad"))
        token = token.replace(GOOD_IMAGES, str(workspace / "good_images"))
        out.append(token.replace(DEMO_CACHE, str(cache_dir())))
    return out


def uses_demo_outputs(argv: list[str], workspace: Path) -> bool:
    """Whether the command reads what the demo wrote, and all of that exists."""
    paths = [t for t in argv if t == "runs" or t.startswith("runs/")]
    return bool(paths) and all((workspace / p).exists() for p in paths)


def with_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` with ``flag`` added before any ``--`` (arguments for the training runs)."""
    if flag in argv:
        return argv
    at = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:at], flag, *argv[at:]]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # --help and --print_config exit from inside the parser
        return done.code or 0


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command(command: Command, workspace: Path, request, monkeypatch, capsys):
    argv = concrete(command.argv, workspace)
    subcommand = argv[0] if argv else ""
    if argv == ["fit"]:
        request.getfixturevalue("demo_run")  # the demo itself, run once for every page showing it
        return
    if uses_demo_outputs(argv, workspace):
        request.getfixturevalue("demo_run")  # the demo's commands see its run folder
    monkeypatch.chdir(workspace)
    if "--help" in argv or "-h" in argv or subcommand == "configs":
        code = run(argv)
    elif subcommand == "fit":
        code = run(with_flag(argv, "--print_config"))
    elif subcommand == "reproduce":
        code = run(with_flag(argv, "--dry-run"))
    elif uses_demo_outputs(argv, workspace):
        code = run(argv)
    else:
        stop_at_parsing(monkeypatch)
        with pytest.raises(Parsed):
            run(argv)
        return
    err = capsys.readouterr().err
    assert code == 0, f"{command}: anomaly {shlex.join(command.argv)}\n{err[-2000:]}"


def stop_at_parsing(monkeypatch) -> None:
    """Every argparse parser raises :class:`Parsed` once it has accepted its arguments."""
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        parse(parser, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)


@pytest.mark.parametrize("command", SCRIPTS, ids=str)
def test_documented_script(command: Command, workspace: Path, monkeypatch):
    """A documented ``python <script>.py ...`` passes the script's own parser (nothing is run)."""
    script, *args = concrete(command.argv, workspace)
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), *args])
    stop_at_parsing(monkeypatch)
    with pytest.raises(Parsed):
        runpy.run_path(str(REPO / script), run_name="__main__")
