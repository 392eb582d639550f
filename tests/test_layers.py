"""The layer contracts in pyproject.toml ([tool.importlinter]): kept by the code, and able to fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blockmarket", "runtime", "conversion", "training")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the packages under ``root`` (the first entry of the path: that copy is analysed)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_tree(target: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_the_code_keeps_every_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    tree = copy_of_tree(tmp_path)
    state = tree / "blockmarket" / "core" / "state.py"
    state.write_text(state.read_text() + "\nfrom runtime import server  # injected: core reaching up\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "Layers: cli, demo, dashboard > training" in done.stdout and "BROKEN" in done.stdout
    assert "blockmarket.core.state -> runtime.server" in done.stdout


def test_torch_in_the_serving_layers_breaks_its_contract(tmp_path: Path) -> None:
    tree = copy_of_tree(tmp_path)
    pool = tree / "runtime" / "scheduler.py"
    pool.write_text(pool.read_text() + "\nimport torch  # injected: serving importing torch\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "Serving never imports torch" in done.stdout
    assert "runtime.scheduler -> torch" in done.stdout
