"""The command line's own mistakes as one clear line.

jsonargparse reports a rejected option as a nested, multi-line message; here it
becomes ``--<key>: <what> (given: <value>)``, an unknown option names its class and
the closest option, and a ``--config`` file that is not a YAML mapping is named with
the line at fault. Each is raised as :class:`~anomaly.errors.ArgumentsError`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from pathlib import Path

import yaml

from anomaly.errors import ArgumentsError


def init_options(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` and its bases (what ``--model.<name>`` accepts)."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for base in inspect.getmro(cls):
        if "__init__" in vars(base):
            parameters = inspect.signature(base.__init__).parameters
            names += [name for name in parameters if name not in ("self", "args", "kwargs")]
    return names


def unknown_option_message(message: str) -> str | None:
    """``--model.backbon is not an option of GaussianAD (did you mean --model.backbone?)``, or None."""
    found = re.search(r"Option '([^']+)' is not accepted", message)
    group = re.search(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"given class_path '([^']+)'", message)
    if not (found and group and class_path):
        return None
    option, prefix = found.group(1), f"--{group.group(1)}"
    text = f"{prefix}.{option} is not an option of {class_path.group(1).rpartition('.')[2]}"
    close = difflib.get_close_matches(option, init_options(class_path.group(1)), n=1)
    return text + (f" (did you mean {prefix}.{close[0]}?)" if close else "") + "; see --help for the options"


#: Options whose numbers have a range, named when a non-finite value is given.
NUMBER_RANGES = {"target_fpr": "in (0, 1)", "fpr": "in (0, 1)"}
#: The most items a command-line value may expand to through YAML anchors and aliases.
MAX_EXPANDED_ITEMS = 10_000


def non_finite_message(keys: list[str], given: str | None) -> str | None:
    """``--model.target_fpr: must be a finite number in (0, 1) (given: nan)``, or None."""
    try:
        value = float(given) if given is not None else 0.0
    except ValueError:
        return None
    if math.isfinite(value):
        return None
    span = NUMBER_RANGES.get(keys[-1].rpartition(".")[2] if keys else "", "")
    return f"--{'.'.join(keys)}: must be a finite number{' ' + span if span else ''} (given: {given})"


def one_line_parse_error(message: str) -> str:
    """jsonargparse's nested, multi-line complaint as ``--<key>: <what> (given: <value>)``."""
    unknown = unknown_option_message(message)
    if unknown:
        return unknown
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    wanted = ("is not accepted", "does not exist", "Expected a", "not a valid", "unrecognized", "Invalid")
    detail = next((line for line in lines if any(w in line for w in wanted)), lines[0] if lines else "")
    detail = re.sub(r'^Parser key "[^"]+":\s*', "", detail)
    given = re.search(r"Given value: (?!NestedArg)(.+)", message)
    got = re.search(r"Got value: (\S+)", message)
    non_finite = non_finite_message(keys, (given or got).group(1).strip() if (given or got) else None)
    if non_finite:
        return f"{non_finite}; see --help for the options"
    text = f"--{'.'.join(keys)}: {detail}" if keys else detail
    if "collections.abc.Sequence" in detail:
        text += ', e.g. "[7]" or "[5, 7]"'
    if given and "Got value" not in detail:
        text += f" (given: {given.group(1).strip()})"
    return f"{text}; see --help for the options"


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE`` or ``--config=FILE``."""
    files = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--config"]
    return files + [token.split("=", 1)[1] for token in argv if token.startswith("--config=")]


def check_config_file(path: str) -> None:
    """:class:`ArgumentsError` naming the file (and the line) for a config that is not a YAML mapping."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ArgumentsError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ArgumentsError(f"--config {path}: {where}{problem} (not valid YAML)") from None
    if not isinstance(content, dict):
        found = "is empty" if content is None else f"holds a {type(content).__name__}"
        raise ArgumentsError(f"--config {path} {found}: it must map options to values (model:, data:, ...)")


def expanded_items(node: yaml.Node, sizes: dict[int, int] | None = None) -> int:
    """How many scalars, lists and mappings ``node`` becomes once its aliases are expanded.

    An alias is the same node object as its anchor, so each node is counted once and
    reused: the count of an anchor bomb is computed without expanding it.
    """
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that refers to itself counts once
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        sizes[id(node)] = 1 + sum(expanded_items(child, sizes) for child in children)
    return sizes[id(node)]


def check_expanded_values(argv: list[str]) -> None:
    """Refuse a command-line value that YAML anchors and aliases blow up (the parser would expand it)."""
    option = ""
    for token in argv:
        name, equals, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if token.startswith("--") and not equals:
            option = token
            continue
        if "*" not in value or "&" not in value:
            continue
        try:
            node = yaml.compose(value, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            continue
        items = 0 if node is None else expanded_items(node)
        if items > MAX_EXPANDED_ITEMS:
            raise ArgumentsError(
                f"{name or option}: the value expands to {items:,} items through YAML anchors and aliases "
                f"(at most {MAX_EXPANDED_ITEMS:,}): write the value out"
            )
