"""Model files are found next to their metadata, whatever path (and OS) the metadata was written with;
their version is their content's hash; an entry that is no regular file is a clear error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

from blockmarket.models import files as models
from blockmarket.models.files import (
    METADATA_SUFFIX,
    ModelError,
    StaleMetadata,
    discover_models,
    model_file,
    read_model,
    read_models,
)
from tests.support.serving import ITEMS, model_metadata, trading_model, trading_weights, write_model

# How the original converter and a Windows machine stored `onnx_path`, and a path on another machine.
STORED = {
    "windows absolute": r"C:\Users\trader\models\trading_agents\onnx\{}",
    "windows relative": r"models\trading_agents\onnx\{}",
    "windows UNC": r"\\fileserver\models\onnx\{}",
    "posix elsewhere": "/srv/old-host/models/onnx/{}",
    "posix relative": "models/trading_agents/onnx/{}",
    "name only": "{}",
}


def rewrite(metadata: Path, pattern: str) -> None:
    """Store every model path of ``metadata`` the way ``pattern`` does."""
    data = json.loads(metadata.read_text())
    data["model_info"]["onnx_path"] = pattern.format(data["model_info"]["onnx_path"])
    for variant in data["npu_optimization"]["variants"]:
        variant["onnx_path"] = pattern.format(variant["onnx_path"])
    metadata.write_text(json.dumps(data))


@pytest.mark.parametrize("pattern", STORED.values(), ids=STORED.keys())
def test_stored_paths_resolve_next_to_the_metadata(tmp_path: Path, pattern: str) -> None:
    model_dir = tmp_path / "copied here"
    metadata = write_model(model_dir, "m0", trading_weights(0), variants=[(4, trading_weights(0))])
    rewrite(metadata, pattern)
    info = read_model(metadata)
    assert info.onnx_path == model_dir / "m0.onnx"
    assert [v.path for v in info.variants] == [model_dir / "m0_fp32_b4.onnx"]


@pytest.mark.parametrize("stored", ["", "..", r"C:\models\..", "C:\\", None, 7])
def test_a_stored_value_that_names_no_file_is_a_clear_error(tmp_path: Path, stored: object) -> None:
    metadata = tmp_path / "m0_metadata.json"
    with pytest.raises(
        ModelError, match=r"m0_metadata\.json: model_info\.onnx_path .* does not name a model"
    ):
        model_file(metadata, stored)


def test_a_bad_variant_path_skips_that_model_with_a_line_naming_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "onnx"
    write_model(model_dir, "m0", trading_weights(0))
    metadata = write_model(model_dir, "m1", trading_weights(1), variants=[(4, trading_weights(1))])
    data = json.loads(metadata.read_text())
    del data["npu_optimization"]["variants"][0]["onnx_path"]
    metadata.write_text(json.dumps(data))
    models, problems = discover_models(model_dir, ITEMS)
    assert [m.key for m in models] == ["m0"]
    assert (
        len(problems) == 1 and "m1_metadata.json: npu_optimization.variants[].onnx_path None" in problems[0]
    )


def replace_model_file(model_dir: Path, key: str, seed: int) -> str:
    """Replace `<key>.onnx` with other weights as the converter does (its metadata left as it was);
    returns the new file's sha256."""
    staged = model_dir / f".{key}.onnx.tmp"
    onnx.save_model(trading_model(trading_weights(seed)), str(staged))
    staged.replace(model_dir / f"{key}.onnx")
    return hashlib.sha256((model_dir / f"{key}.onnx").read_bytes()).hexdigest()


def test_the_version_is_the_content_hash_of_the_model_file(tmp_path: Path) -> None:
    """Issue 10: with `m0.onnx` replaced and its metadata left alone, the version stayed what the
    metadata declared. Without a declared sha256 the version follows the file; with a stale one the
    model is refused, naming both hashes."""
    meta = tmp_path / f"m0{METADATA_SUFFIX}"
    meta.write_text(json.dumps(model_metadata("m0", 16)))  # the original converter wrote no sha256
    first = replace_model_file(tmp_path, "m0", 1)
    assert read_model(meta).version == first[:12]
    second = replace_model_file(tmp_path, "m0", 2)
    assert read_model(meta).version == second[:12]

    meta.write_text(json.dumps(model_metadata("m0", 16, onnx_sha256=second)))
    assert read_model(meta).version == second[:12]
    third = replace_model_file(tmp_path, "m0", 3)
    with pytest.raises(
        StaleMetadata, match=f"sha256 {third[:12]}, but m0_metadata.json declares {second[:12]}"
    ):
        read_model(meta)


def test_an_unchanged_model_file_is_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    digest = hashlib.file_digest

    def counting(handle: Any, name: str) -> Any:
        hashed.append(name)
        return digest(handle, name)

    monkeypatch.setattr(models.hashlib, "file_digest", counting)
    meta = write_model(tmp_path, "m0", trading_weights(0))
    onnx_path = tmp_path / "m0.onnx"
    version = read_model(meta).version
    assert read_model(meta).version == version and len(hashed) == 1
    stat = onnx_path.stat()
    os.utime(onnx_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    assert read_model(meta).version == version and len(hashed) == 2
    shutil.copyfile(onnx_path, tmp_path / "copy")
    os.replace(tmp_path / "copy", onnx_path)  # replaced by a new file: a new inode
    assert read_model(meta).version == version and len(hashed) == 3


def make_entry(path: Path, kind: str) -> None:
    """A directory entry that is no readable regular file."""
    if kind == "symlink loop":
        path.symlink_to(path.name)
    elif kind == "dangling symlink":
        path.symlink_to("nowhere")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)  # opening it to read would wait for a writer for ever


ENTRIES = {
    "symlink loop": "Too many levels of symbolic links",
    "dangling symlink": "No such file or directory",
    "directory": "not a regular file",
    "fifo": "not a regular file",
}


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and symlinks made by a test need POSIX")
@pytest.mark.parametrize("kind", ENTRIES)
@pytest.mark.parametrize("which", ["metadata", "model file"])
def test_an_entry_that_is_no_regular_file_is_a_model_error_naming_it(
    tmp_path: Path, kind: str, which: str
) -> None:
    write_model(tmp_path, "m0", trading_weights(0))
    meta = tmp_path / f"bad{METADATA_SUFFIX}"
    if which == "metadata":
        make_entry(meta, kind)
        named = meta
    else:
        meta.write_text(json.dumps(model_metadata("bad", 16)))
        make_entry(tmp_path / "bad.onnx", kind)
        named = tmp_path / "bad.onnx"
    found, problems = read_models(sorted(tmp_path.glob(f"*{METADATA_SUFFIX}")))  # returns: no FIFO wait
    assert [m.key for m in found] == ["m0"]
    (problem,) = problems
    assert str(problem).startswith(f"{named}: ") and ENTRIES[kind] in str(problem)
