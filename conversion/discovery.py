"""Which files under the model folder a run converts, and which matching ones it refuses (and why).

Symlinks: a file symlink is accepted when its target is a regular file inside the model folder (a
`latest.pth` link; it converts under the link's name) and refused otherwise, so a link cannot make
the converter read a system file. Symlinked directories are never searched: one inside the folder
only repeats files already found at their real path, one outside would escape it, and either can
form a loop. Each refusal is reported, never dropped silently. Hard links cannot be told apart from
ordinary files and are not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Discovery:
    """The checkpoints to convert, the matching files refused, and the folders not searched."""

    found: list[Path] = field(default_factory=list)
    refused: dict[Path, str] = field(default_factory=dict)  # path -> one line naming it and why
    not_searched: list[str] = field(default_factory=list)  # one line per symlinked/unreadable folder


def discover(root: Path, pattern: str, exclude: Path) -> Discovery:
    """Files under ``root`` whose relative path matches ``pattern`` (as ``root.rglob(pattern)``
    would), outside ``exclude``, walking real directories only."""
    real_root, excluded = root.resolve(), exclude.resolve()
    result = Discovery()

    def unreadable(error: OSError) -> None:
        result.not_searched.append(f"{error.filename}: cannot search ({error.strerror})")

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        here = Path(folder)
        linked = {d for d in dirs if (here / d).is_symlink()}
        for name in sorted(linked):
            if (here / name).resolve() != excluded:
                target = os.readlink(here / name)
                result.not_searched.append(f"{here / name}: symlinked directory (-> {target}) not searched")
        dirs[:] = sorted(d for d in dirs if d not in linked and (here / d).resolve() != excluded)
        if here.resolve().is_relative_to(excluded):
            continue
        for name in files:
            path = here / name
            if path.relative_to(root).match(pattern):
                reason = _refusal(path, real_root)
                if reason:
                    result.refused[path] = f"{path}: {reason}"
                else:
                    result.found.append(path)
    result.found.sort()
    return result


def _refusal(path: Path, real_root: Path) -> str | None:
    """Why a matching file is not converted, or None."""
    if not path.is_symlink():
        return None if path.is_file() else "not a regular file"
    target = path.resolve()
    if not target.is_relative_to(real_root):
        return f"symlink to {target}, outside the model folder {real_root}: not followed"
    if not target.is_file():
        return f"symlink to {target}, which is not a regular file"
    return None
