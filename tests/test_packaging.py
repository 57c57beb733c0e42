"""The package as a user installs it: every subpackage in the wheel, the shipped configs in one place
(the top-level ``configs/``) and resolved by name from any folder by an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.configs import CONFIG_DIR, shipped_configs
from tests.conftest import make_mvtec_category

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    inits = (REPO / "anomaly").rglob("__init__.py")
    found = {".".join(init.parent.relative_to(REPO).parts) for init in inits}
    assert set(listed) == found | {"anomaly.configs.shipped"}


def test_the_shipped_configs_live_in_the_top_level_configs_folder():
    assert CONFIG_DIR == REPO / "configs"
    assert shipped_configs() == sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
    assert "default" in shipped_configs()
    assert [path for pattern in ("*.yaml", "*.yml") for path in (REPO / "anomaly").rglob(pattern)] == []


def checkout(destination: Path) -> Path:
    """The clone's tracked and not-ignored files (what a fresh checkout of this tree holds)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git clone")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


@pytest.mark.slow
def test_an_installed_wheel_runs_a_shipped_config_by_name_from_any_folder(tmp_path: Path):
    source = checkout(tmp_path / "checkout")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"  # the wheel alone; its dependencies come from this environment
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)  # fmt: skip
    shutil.rmtree(source)  # the installed package must not need the checkout
    elsewhere = tmp_path / "elsewhere"
    data = make_mvtec_category(elsewhere / "data", n_train=8, n_good=2, n_bad=2, size=32)
    env = {**os.environ, "PYTHONPATH": str(site), "ANOMALY_CACHE": str(tmp_path / "cache")}

    def anomaly(*args: str) -> str:
        run = subprocess.run([str(site / "bin" / "anomaly"), *args], cwd=elsewhere, env=env,
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout

    listing = anomaly("configs")
    assert f"files in {site / 'anomaly' / 'configs' / 'shipped'}" in listing
    listed = {line.split()[0] for line in listing.splitlines()[: len(shipped_configs())]}
    assert listed == set(shipped_configs())
    anomaly("fit", "--config", "spatial_grid", "--data.root", str(data), "--data.category", "widget",
            "--data.num_workers", "0", "--model.levels", "[3, 5]",
            "--trainer.enable_progress_bar", "false")  # fmt: skip
    (detector,) = (elsewhere / "runs").rglob("detector.safetensors")  # spatial_grid's, not the default's
    run = detector.relative_to(elsewhere / "runs")
    assert run.parts[:2] == ("spatial", "efficientnet-lite0_levels-3-5_grid-4")
