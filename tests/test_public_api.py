"""The README's public imports keep working (the move into blockmarket/ kept them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_imports() -> list[str]:
    """Every import line of the README's Python code blocks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [line for block in blocks for line in block.splitlines() if re.match(r"(from \S+ )?import ", line)]


def test_the_readme_shows_its_public_imports() -> None:
    lines = readme_imports()
    assert "from conversion import ONNXConverter" in lines
    assert any(line.endswith("import load_config") for line in lines)


def test_every_readme_import_works_in_a_fresh_interpreter() -> None:
    code = "\n".join(readme_imports()) + "\nprint(ONNXConverter.__name__, load_config.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ONNXConverter", "blockmarket.core.config"]
