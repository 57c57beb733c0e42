"""No import circle in the package: no module imports, even inside a function, one that imports it back."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anomaly"


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from package import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (module -> modules it imports), as the path that closes it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if circle := visit(target, [*path, module]):
                return circle
        done.add(module)
        return None

    return next(filter(None, (visit(module, []) for module in sorted(graph))), None)


def test_the_circle_finder_finds_a_circle():
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_package_is_part_of_an_import_circle():
    modules = package_modules()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert "anomaly.cli" in graph["anomaly.experiments.worker"]  # imports inside functions count too
    circle = import_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


#: What fitting needs and scoring with a saved detector does not (seconds and hundreds of MB to import).
TRAINING_LIBRARIES = (
    "pytorch_lightning",
    "lightning_fabric",
    "torchmetrics",
    "torchvision",
    "albumentations",
)


def test_scoring_with_a_saved_detector_imports_no_training_library(tmp_path: Path):
    """``anomaly predict`` scores a part without importing Lightning & co, nor scikit-learn (it scores
    with the model, not the API); the Python API imports scikit-learn (its base classes), nothing more."""
    from tests.detector.helpers import demo_images, fit_demo_detector

    detector = fit_demo_detector().save(tmp_path / "detector.safetensors")
    _, good, _ = demo_images()
    probe = f"""
import json, sys
def loaded():
    return sorted(m for m in {(*TRAINING_LIBRARIES, "sklearn")!r} if m in sys.modules)
from anomaly.commands import main
code = main(["predict", "--detector", {str(detector)!r}, "--input", {str(good[0])!r},
             "--out", {str(tmp_path / "scores.csv")!r}, "--no-progress"])
by_predict = loaded()
from anomaly.detector import GaussianDetector
GaussianDetector.load({str(detector)!r}).score_samples([{str(good[1])!r}])
print(json.dumps([code, by_predict, loaded()]))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == [0, [], ["sklearn"]], done.stderr[-2000:]
