"""scripts/check-sizes: no module over 400 lines, no function over 60, unless a `# size:` comment says why."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-sizes"


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("check_sizes", str(SCRIPT))
    spec = importlib.util.spec_from_loader("check_sizes", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_code_has_no_oversized_module_or_function() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_a_long_function_is_reported_unless_a_comment_says_why(tmp_path: Path) -> None:
    sizes = load_script()
    package = tmp_path / "runtime"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    (package / "long.py").write_text(f"def long():\n{body}")
    assert list(sizes.offenders(tmp_path)) == ["runtime/long.py:1: long has 71 lines (max 60)"]
    (package / "long.py").write_text(f"# size: a table of constants, one a line\ndef long():\n{body}")
    assert list(sizes.offenders(tmp_path)) == []
    (package / "big.py").write_text("x = 1\n" * 401)
    assert list(sizes.offenders(tmp_path)) == ["runtime/big.py: 401 lines (max 400)"]
