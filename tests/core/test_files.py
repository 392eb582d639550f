"""Replacing a file a reader holds open: Windows' refusal is simulated (PermissionError with winerror)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockmarket.core import files


def refuse_renames(monkeypatch: pytest.MonkeyPatch, times: int, winerror: int | None) -> list[Path]:
    """The next ``times`` renames fail as Windows' do while a reader has the target open (winerror
    None: a POSIX permission error); returns the targets of every attempt."""
    attempts: list[Path] = []
    real_replace = os.replace

    def replace(source: Path, target: Path) -> None:
        attempts.append(target)
        if len(attempts) <= times:
            error = PermissionError(13, "The process cannot access the file")
            if winerror is not None:
                error.winerror = winerror  # type: ignore[attr-defined]  # only Windows sets it
            raise error
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    return attempts


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    source, target = tmp_path / ".m0.onnx.tmp", tmp_path / "m0.onnx"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    return source, target


@pytest.mark.parametrize("winerror", [5, 32])
def test_a_target_busy_for_a_moment_is_replaced(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[Path, Path], winerror: int
) -> None:
    source, target = pair
    attempts = refuse_renames(monkeypatch, 3, winerror)
    files.replace_file(source, target)
    assert len(attempts) == 4 and target.read_bytes() == b"new" and not source.exists()


def test_a_posix_permission_error_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[Path, Path]
) -> None:
    source, target = pair
    attempts = refuse_renames(monkeypatch, 1, None)
    with pytest.raises(PermissionError):
        files.replace_file(source, target)
    assert len(attempts) == 1 and target.read_bytes() == b"old"


def test_a_target_busy_for_good_fails_with_the_real_error(
    monkeypatch: pytest.MonkeyPatch, pair: tuple[Path, Path]
) -> None:
    source, target = pair
    monkeypatch.setattr(files, "BUSY_RETRY_S", 0.2)
    attempts = refuse_renames(monkeypatch, 10_000, 32)
    with pytest.raises(PermissionError, match="cannot access the file"):
        files.replace_file(source, target)
    assert 2 <= len(attempts) < 100 and target.read_bytes() == b"old"
