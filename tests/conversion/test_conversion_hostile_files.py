"""Hostile files among real checkpoints: each is one error line naming it, the rest still convert.

Symlinks out of the model folder, text files named `.pth`, malformed agent fields and zip bombs
(archives declaring more than a checkpoint can hold, refused from the zip directory before torch
reads or allocates anything).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from blockmarket.core.config import Config
from conversion import converter as converter_module
from conversion.checkpoint import CheckpointError, load_checkpoint
from conversion.container import MAX_CHECKPOINT_BYTES
from conversion.converter import ONNXConverter
from conversion.discovery import discover
from conversion.results import ConversionResult
from tests.support.checkpoints import one_error_line_each, run_module
from tests.support.original_format import ITEMS_5, make_network, write_original_checkpoint

GIB3 = 3 * 2**30


def declare_sizes(path: Path, declared: dict[str, tuple[int, int]]) -> Path:
    """Rewrite the central directory so each named entry declares (unpacked, stored) sizes: what a
    hostile archive can claim about its entries, whatever they hold."""
    raw = bytearray(path.read_bytes())
    for name, (unpacked, stored) in declared.items():
        header = -1
        while True:  # central headers: name length at +28, the name at +46, sizes at +20
            header = raw.index(b"PK\x01\x02", header + 1)
            length = struct.unpack_from("<H", raw, header + 28)[0]
            if raw[header + 46 : header + 46 + length] == name.encode():
                break
        struct.pack_into("<2L", raw, header + 20, stored, unpacked)
    path.write_bytes(bytes(raw))
    return path


def rezip(source: Path, target: Path, replace: dict[str, bytes], compress: bool = False) -> Path:
    """A copy of a torch.save archive with some entries' data replaced (deflated when ``compress``)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for entry in original.infolist():
            name = entry.filename
            method = zipfile.ZIP_DEFLATED if compress and name in replace else zipfile.ZIP_STORED
            copy.writestr(name, replace.get(name, original.read(name)), compress_type=method)
    return target


def data_entry(path: Path) -> str:
    """The first tensor record of a torch.save archive (``<stem>/data/0``)."""
    return next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))


def good_checkpoint(path: Path, seed: int = 0) -> Path:
    return write_original_checkpoint(path, make_network("TradingNetwork", 5, seed=seed), agent_id=path.stem)


def refused_quickly(path: Path) -> str:
    """load_checkpoint's refusal message, asserting it came well within a second."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert time.perf_counter() - start < 1.0
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# ---- the run: every bad file is one line, the good ones convert ----------------------------------


@pytest.mark.slow
def test_hostile_files_are_one_line_each_and_the_rest_convert(
    tmp_path: Path, model_dir: Path, config_file: Path
) -> None:
    good = [
        good_checkpoint(model_dir / "agent_gen1_rank1.pth"),
        good_checkpoint(model_dir / "z" / "agent_9_final.pth", 1),
    ]
    outside = good_checkpoint(tmp_path / "elsewhere" / "agent_gen2_rank1.pth", 2)
    bomb = model_dir / "agent_gen3_rank1.pth"
    rezip(good[0], bomb, {})
    declare_sizes(bomb, {data_entry(bomb): (GIB3, 31232)})
    malformed = model_dir / "agent_gen4_rank1.pth"
    write_original_checkpoint(malformed, make_network("TradingNetwork", 5), agent_id="m")
    payload = torch.load(malformed, weights_only=False)
    payload["inventory"] = dict.fromkeys(ITEMS_5, "lots")
    torch.save(payload, malformed)
    bad = {
        "passwd": model_dir / "passwd.pth",
        "text": model_dir / "x.pth",
        "bomb": bomb,
        "malformed": malformed,
    }
    bad["passwd"].symlink_to("/etc/passwd")
    bad["text"].write_text("not a checkpoint\n")
    linked = model_dir / "latest.pth"  # inside the folder: accepted, named for the link
    linked.symlink_to(good[0])
    loops = {model_dir / "z" / "loop": model_dir, model_dir / "out": outside.parent}
    for link, target in loops.items():
        link.symlink_to(target, target_is_directory=True)

    done = run_module("--model-path", str(model_dir), "--config", str(config_file), "--no-progress")

    assert done.returncode == 1, done.stderr
    lines = one_error_line_each(done.stderr, bad.values())
    reasons = {kind: lines[path] for kind, path in bad.items()}
    assert "outside the model folder" in reasons["passwd"] and "root:" not in done.stderr
    assert "not a PyTorch checkpoint" in reasons["text"]
    assert f"'{data_entry(bomb)}' declares 3,072.0 MiB" in reasons["bomb"]
    assert "'inventory'" in reasons["malformed"]
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
    for link in loops:
        assert sum(f"{link}: symlinked directory" in line for line in warnings) == 1, warnings
    out = model_dir / "onnx"
    assert {p.name for p in out.glob("*.onnx")} == {
        "agent_gen1_rank1.onnx",
        "z__agent_9_final.onnx",
        "latest.onnx",
    }
    assert len([line for line in done.stdout.splitlines() if line.startswith("FAILED")]) == len(bad)


def test_an_unexpected_exception_is_one_line_and_a_debug_traceback(
    config: Config, model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a file makes the loader raise (here an allocation failure, injected: it cannot be
    provoked safely), the run goes on and the user sees one line."""
    victim, other = (
        good_checkpoint(model_dir / "agent_gen1_rank1.pth"),
        good_checkpoint(model_dir / "agent_gen1_rank2.pth", 1),
    )
    real = converter_module.load_checkpoint

    def failing(path: Path) -> object:
        if path == victim:
            raise MemoryError
        return real(path)

    monkeypatch.setattr(converter_module, "load_checkpoint", failing)
    with caplog.at_level(logging.DEBUG, logger="conversion.converter"):
        results = {r.source: r for r in ONNXConverter(config).convert_all_models()}

    assert results[other].status == "converted"
    assert results[victim].status == "failed"
    assert (
        results[victim].error
        == f"{victim}: MemoryError (unexpected MemoryError: traceback at logging.level DEBUG)"
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [results[victim].error]
    traced = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(traced) == 1 and traced[0].exc_info is not None and traced[0].exc_info[0] is MemoryError


# ---- discovery: symlinks, loops, special files ---------------------------------------------------


def test_discovery_follows_no_symlink_out_of_the_folder_and_reports_each(
    tmp_path: Path, model_dir: Path
) -> None:
    real = good_checkpoint(model_dir / "run" / "agent_gen1_rank1.pth")
    outside = good_checkpoint(tmp_path / "elsewhere" / "agent_1_final.pth")
    links = {
        "inside": (model_dir / "latest.pth", real),
        "outside": (model_dir / "stolen.pth", outside),
        "system": (model_dir / "run" / "passwd.pth", Path("/etc/passwd")),
        "dangling": (model_dir / "gone.pth", model_dir / "nothing.pth"),
        "to_folder": (model_dir / "folder.pth", model_dir / "run"),
    }
    for link, target in links.values():
        link.symlink_to(target)
    (model_dir / "run" / "loop").symlink_to(model_dir, target_is_directory=True)
    (model_dir / "away").symlink_to(outside.parent, target_is_directory=True)

    found = discover(model_dir, "*.pth", model_dir / "onnx")

    assert found.found == [links["inside"][0], real]
    assert set(found.refused) == {links[k][0] for k in ("outside", "system", "dangling")}
    for kind in ("outside", "system"):
        link, target = links[kind]
        assert found.refused[link] == (
            f"{link}: symlink to {target.resolve()}, outside the model folder {model_dir.resolve()}: "
            "not followed"
        )
    dangling = links["dangling"][0]
    assert (
        found.refused[dangling]
        == f"{dangling}: symlink to {(model_dir / 'nothing.pth').resolve()}, which is not a regular file"
    )
    assert found.not_searched == [
        f"{model_dir / 'away'}: symlinked directory (-> {outside.parent}) not searched",
        f"{model_dir / 'folder.pth'}: symlinked directory (-> {model_dir / 'run'}) not searched",
        f"{model_dir / 'run' / 'loop'}: symlinked directory (-> {model_dir}) not searched",
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_not_waited_on(config: Config, model_dir: Path) -> None:
    model_dir.mkdir(parents=True)
    pipe = model_dir / "agent_gen1_rank1.pth"
    os.mkfifo(pipe)
    assert discover(model_dir, "*.pth", model_dir / "onnx").refused == {pipe: f"{pipe}: not a regular file"}
    results: list[ConversionResult] = []
    worker = threading.Thread(
        target=lambda: results.append(ONNXConverter(config).convert_single_model(pipe)), daemon=True
    )
    worker.start()
    worker.join(timeout=30)
    assert results, "the converter is waiting for a writer on the pipe"
    assert results[0].error == f"{pipe}: not a regular file"


def test_discovery_matches_what_rglob_matched_on_a_plain_tree(model_dir: Path, tree: list[object]) -> None:
    for pattern in ("*.pth", "*_final.pth", "run1/*.pth", "final/*.pth", "agent_gen5_*", "*.nothing"):
        expected = sorted(p for p in model_dir.rglob(pattern) if p.is_file())
        assert discover(model_dir, pattern, model_dir / "onnx").found == expected, pattern


# ---- containers: zip bombs, formats ------------------------------------------------------------


def test_an_entry_declaring_gigabytes_is_refused_from_the_directory(tmp_path: Path) -> None:
    bomb = rezip(good_checkpoint(tmp_path / "good.pth"), tmp_path / "bomb.pth", {})
    entry = data_entry(bomb)
    declare_sizes(bomb, {entry: (GIB3, 31232)})
    assert refused_quickly(bomb).endswith(
        f"refused: entry '{entry}' declares 3,072.0 MiB (3,221,225,472 bytes) unpacked; a checkpoint "
        "holds at most 512.0 MiB (536,870,912 bytes)"
    )


def test_a_real_deflate_bomb_is_refused_by_its_expansion(tmp_path: Path) -> None:
    good = good_checkpoint(tmp_path / "good.pth")
    entry = data_entry(good)
    bomb = rezip(good, tmp_path / "bomb.pth", {entry: bytes(40 * 2**20)}, compress=True)
    assert zipfile.ZipFile(bomb).getinfo(entry).compress_size < 100_000  # ~41 KB of deflate
    message = refused_quickly(bomb)
    assert f"entry '{entry}' declares 40.0 MiB (41,943,040 bytes) unpacked from" in message
    assert "more than 100x (a zip bomb)" in message


def test_entries_within_limits_that_add_up_beyond_them_are_refused(tmp_path: Path) -> None:
    good = good_checkpoint(tmp_path / "good.pth")
    names = [n for n in zipfile.ZipFile(good).namelist() if "/data/" in n][:3]
    bomb = declare_sizes(
        rezip(good, tmp_path / "bomb.pth", {}), dict.fromkeys(names, (200 * 2**20, 3 * 2**20))
    )
    message = refused_quickly(bomb)
    entries = zipfile.ZipFile(bomb).infolist()
    total = sum(entry.file_size for entry in entries)
    assert total > 600 * 2**20 and max(entry.file_size for entry in entries) == 200 * 2**20
    assert message.endswith(
        f"refused: its {len(entries)} entries declare 600.4 MiB ({total:,} bytes) unpacked; a checkpoint "
        "holds at most 512.0 MiB (536,870,912 bytes)"
    )


def test_a_zip_directory_too_large_for_a_checkpoint_is_refused(tmp_path: Path) -> None:
    bomb = rezip(good_checkpoint(tmp_path / "good.pth"), tmp_path / "bomb.pth", {})
    raw = bytearray(bomb.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    struct.pack_into("<L", raw, end + 12, 64 * 2**20)  # what zipfile would read and parse
    bomb.write_bytes(bytes(raw))
    assert "refused: its zip directory declares 64.0 MiB" in refused_quickly(bomb)


def test_torch_zip64_end_record_is_what_gets_checked(tmp_path: Path) -> None:
    """torch.save writes a zip64 end record: its directory size is the one that counts."""
    bomb = good_checkpoint(tmp_path / "bomb.pth")
    raw = bytearray(bomb.read_bytes())
    end64 = raw.rindex(b"PK\x06\x06")
    struct.pack_into("<Q", raw, end64 + 40, 64 * 2**20)
    bomb.write_bytes(bytes(raw))
    assert "refused: its zip directory declares 64.0 MiB" in refused_quickly(bomb)


def test_a_file_larger_than_any_checkpoint_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "huge.pth"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_CHECKPOINT_BYTES + 1)  # sparse: no disk space used
    assert refused_quickly(huge).endswith("on disk; a checkpoint is at most 512.0 MiB (536,870,912 bytes)")


def test_legacy_format_loads_and_plain_pickles_and_empty_files_are_refused(tmp_path: Path) -> None:
    good = good_checkpoint(tmp_path / "good.pth")
    payload = torch.load(good, weights_only=False)
    legacy = tmp_path / "legacy.pth"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(legacy)
    assert loaded.agent_id == "good"
    for key, value in payload["network_state_dict"].items():
        assert torch.equal(loaded.network_state_dict[key], value)

    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps(payload["network_state_dict"], protocol=2))
    assert refused_quickly(plain).endswith(
        "not a PyTorch checkpoint: neither a zip archive (torch.save) nor the legacy format"
    )
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert refused_quickly(empty).endswith("not a PyTorch checkpoint: an empty file")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "corrupt or not a PyTorch checkpoint" in refused_quickly(truncated)
