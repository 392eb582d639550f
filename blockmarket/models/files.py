"""The converted models a runtime can serve: `<name>.onnx` + `<name>_metadata.json` in the model directory.

Read-only and torch-free: the converter writes these files, the runtime (startup and hot reload) reads
them. A model's *version* is the start of the sha256 of the ONNX file's content, hashed here whatever the
metadata declares: a replaced file is a new version, and a metadata file that declares another sha256
describes some other file (or the converter has not rewritten it yet), so the model is refused.
Everything here blocks on the file system; coroutines call it through a thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

METADATA_SUFFIX = "_metadata.json"
VARIANT_KEY = "npu_optimization.variants[].onnx_path"


class ModelError(ValueError):
    """A model file or its metadata cannot be served (the message names the file)."""


class StaleMetadata(ModelError):
    """The metadata declares another sha256 than its model file has: it describes another file, or the
    converter replaced the model and has not written the new metadata yet."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key  # the model's


@dataclass(frozen=True)
class NpuVariant:
    """A static-batch model exported for the QNN HTP backend next to the fp32 one."""

    path: Path
    precision: str
    batch_size: int


@dataclass(frozen=True)
class ModelInfo:
    """One converted checkpoint: where its ONNX file is and what it computes."""

    key: str  # file stem, unique within the model directory
    onnx_path: Path
    metadata_path: Path
    model_type: str
    input_dim: int
    output_dim: int
    items: tuple[str, ...]
    agent_id: str | None
    desired_item: str | None
    version: str
    hidden_dim: int | None = None
    variants: tuple[NpuVariant, ...] = ()

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def architecture(self) -> tuple[str, int, int | None, int]:
        """Models with equal architecture can share a population pack."""
        return (self.model_type, self.input_dim, self.hidden_dim, self.output_dim)


def open_regular(path: Path) -> io.BufferedReader:
    """Open a file for reading only if it is a regular file: a FIFO would block the reading thread for
    ever (and with it every later reload), a directory or device is no model."""
    try:  # O_NONBLOCK: opening a FIFO that has no writer returns at once instead of waiting for one
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


_hashes: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> ((inode, size, mtime_ns), sha256)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content (the model version; the context-cache fingerprint).

    Cached by (inode, size, mtime_ns) of the file opened, so an unchanged model is not read again at the
    next reload; a file replaced (new inode) or rewritten (new mtime) is hashed afresh.
    """
    with open_regular(path) as handle:
        st = os.fstat(handle.fileno())
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _hashes.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:  # file_digest updates from a reused buffer: hashlib releases the GIL for each block
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    _hashes[str(path)] = (stamp, digest)
    return digest


def model_file(metadata_path: Path, stored: object, key: str = "model_info.onnx_path") -> Path:
    r"""The model file a metadata entry names, always in the metadata file's own directory.

    Only the stored path's last component counts, split at `/` and `\` alike: the original converter
    stored the path it wrote to (`models\trading_agents\onnx\a.onnx`, or `C:\models\a.onnx`), and a
    model directory copied to another machine or OS must not send the runtime back there.
    """
    name = PureWindowsPath(stored).name if isinstance(stored, str) else ""
    if name in ("", ".", ".."):
        raise ModelError(
            f"{metadata_path}: {key} {stored!r} does not name a model file; convert the checkpoint again"
        )
    return metadata_path.with_name(name)


def _field(data: dict[str, Any], section: str, key: str, path: Path) -> Any:
    try:
        return data[section][key]
    except (KeyError, TypeError):
        raise ModelError(f"{path}: metadata has no {section}.{key}; convert the checkpoint again") from None


def read_model(metadata_path: Path) -> ModelInfo:
    """Parse one `<name>_metadata.json`, check its ONNX file produces a trading matrix, hash the file."""
    with open_regular(metadata_path) as handle:
        try:
            data = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{metadata_path}: unreadable metadata ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{metadata_path}: metadata is not a JSON object")
    key = metadata_path.name[: -len(METADATA_SUFFIX)]
    onnx_path = model_file(metadata_path, _field(data, "model_info", "onnx_path", metadata_path))
    if not os.path.lexists(onnx_path):
        raise ModelError(f"{metadata_path}: its model file {onnx_path.name} is missing")
    items = tuple(str(i) for i in _field(data, "model_info", "items_list", metadata_path))
    output_dim = int(_field(data, "model_info", "output_dim", metadata_path))
    if output_dim != len(items) ** 2:
        raise ModelError(
            f"{onnx_path}: output_dim {output_dim} is not a {len(items)}x{len(items)} trading matrix "
            f"(model_type {data['model_info'].get('model_type')}); only matrix-producing models can serve"
        )
    agent = data.get("agent_info") or {}
    sha = sha256_file(onnx_path)
    declared = (data.get("conversion_info") or {}).get("onnx_sha256")
    if declared and declared != sha:
        raise StaleMetadata(
            f"{onnx_path}: its content has sha256 {sha[:12]}, but {metadata_path.name} declares "
            f"{str(declared)[:12]} (conversion_info.onnx_sha256): the metadata describes another file; "
            "convert the checkpoint again",
            key,
        )
    variants = tuple(
        NpuVariant(
            model_file(metadata_path, v.get("onnx_path"), VARIANT_KEY),
            str(v["precision"]),
            int(v["batch_size"]),
        )
        for v in (data.get("npu_optimization") or {}).get("variants", [])
        if isinstance(v, dict) and v.get("batch_size") and v.get("passed") is True  # failed: never served
    )
    return ModelInfo(
        key=key,
        onnx_path=onnx_path,
        metadata_path=metadata_path,
        model_type=str(_field(data, "model_info", "model_type", metadata_path)),
        input_dim=int(_field(data, "model_info", "input_dim", metadata_path)),
        output_dim=output_dim,
        items=items,
        agent_id=agent.get("agent_id"),
        desired_item=agent.get("desired_item"),
        version=sha[:12],
        hidden_dim=data["model_info"].get("hidden_dim"),
        variants=variants,
    )


def metadata_files(model_dir: Path) -> list[Path]:
    """The metadata files of a model directory, in a stable order (the agent assignment depends on it)."""
    return sorted(model_dir.glob(f"*{METADATA_SUFFIX}")) if model_dir.is_dir() else []


def read_models(metadata_paths: Iterable[Path]) -> tuple[list[ModelInfo], list[ModelError]]:
    """The models these metadata files describe, plus one error per file that cannot be served: one bad
    entry never keeps the others from being read."""
    paths = list(metadata_paths)
    if len(paths) < _READ_IN_PARALLEL_FROM:
        outcomes = list(map(_read_or_error, paths))
    else:  # hashing releases the GIL: at 10,000 models two threads halve the 1.7 s of sha256
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            outcomes = list(pool.map(_read_or_error, paths, chunksize=64))
    models = [outcome for outcome in outcomes if isinstance(outcome, ModelInfo)]
    return models, [outcome for outcome in outcomes if isinstance(outcome, ModelError)]


_READ_IN_PARALLEL_FROM = 256  # metadata files from which read_models hashes on several threads


def _read_or_error(path: Path) -> ModelInfo | ModelError:
    try:
        return read_model(path)
    except ModelError as exc:
        return exc


def discover_models(model_dir: Path, items: tuple[str, ...]) -> tuple[list[ModelInfo], list[str]]:
    """Every servable model for this item list, plus one problem line per model skipped."""
    found, errors = read_models(metadata_files(model_dir))
    problems = list(map(str, errors))
    models: list[ModelInfo] = []
    for info in found:
        if info.items != items:
            problems.append(
                f"{info.onnx_path}: trained for items {list(info.items)}, "
                f"the config has {list(items)}; skipped"
            )
            continue
        models.append(info)
    return models, problems
