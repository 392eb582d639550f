"""Refuse a `.pth` file from its header and zip directory alone, before torch reads or allocates.

torch allocates every zip entry at the size the archive declares: a 3 MB file declaring a 3 GB entry
cost 18.7 s and 3.4 GB of RAM before torch gave up. The limits below are derived from what the
registered networks' checkpoints can be, so only hostile or broken files reach them; checking them
reads the file's first bytes and the zip's directory, never an entry's data.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import BinaryIO

MAX_CHECKPOINT_BYTES = 512 * 2**20
"""On disk and unpacked. An original checkpoint holds fp32 weights plus Adam's two moments (~12 bytes a
parameter): under 1 MB at the H=128 of every original config; 512 MiB still admits H=4096 at n=8 for
every registered architecture (the largest, ActorCriticNetwork, ~42 M parameters, ~500 MB)."""

MAX_EXPANSION = 100
"""torch.save stores entries uncompressed (1:1) and float weights deflate ~1.1:1 if re-zipped by hand:
an entry unpacking to more than 100x its stored size is a zip bomb, not weights."""

EXPANSION_FLOOR = 2**20
"""Entries up to this unpacked size are exempt from MAX_EXPANSION (tiny records compress oddly)."""

MAX_DIRECTORY_BYTES = 2**20
"""A checkpoint's zip directory takes ~60 bytes an entry and it has a few per tensor (~40 for the
original format): 1 MiB allows ~17,000 entries. zipfile builds an object per entry, so an unbounded
directory would itself be a memory bomb."""

ZIP_HEAD = b"PK\x03\x04"  # what torch itself checks to pick its zip reader
LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch's magic number, pickled
_END = struct.Struct("<4s4H2LH")  # end of central directory: ..., directory size at [5]
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end record: ..., directory size at [8]
_LOCATOR64 = b"PK\x06\x07"
_LOCATOR64_SIZE = 20


class UnsafeContainer(ValueError):
    """The file is not a torch checkpoint container, or declares more than a checkpoint can hold."""


def check_container(handle: BinaryIO) -> None:
    """Pass a torch zip archive within the limits, or a legacy-format file (whose tensors are read
    from the file itself, so its size bounds it); refuse anything else. Leaves ``handle`` at 0."""
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise UnsafeContainer(f"{_mib(size)} on disk; a checkpoint is at most {_mib(MAX_CHECKPOINT_BYTES)}")
    head = handle.read(len(LEGACY_HEAD))
    try:
        if head.startswith(ZIP_HEAD):
            _check_zip(handle, size)
        elif not head.startswith(LEGACY_HEAD):
            kind = "an empty file" if not head else "neither a zip archive (torch.save) nor the legacy format"
            raise UnsafeContainer(f"not a PyTorch checkpoint: {kind}")
    finally:
        handle.seek(0)


def _check_zip(handle: BinaryIO, size: int) -> None:
    directory = _directory_size(handle, size)
    if directory > MAX_DIRECTORY_BYTES:
        raise UnsafeContainer(
            f"refused: its zip directory declares {_mib(directory)}; a checkpoint's is at most "
            f"{_mib(MAX_DIRECTORY_BYTES)}"
        )
    handle.seek(0)
    entries = zipfile.ZipFile(handle).infolist()  # reads the directory only
    for entry in entries:
        if entry.file_size > MAX_CHECKPOINT_BYTES:
            raise UnsafeContainer(
                f"refused: entry '{entry.filename}' declares {_mib(entry.file_size)} unpacked; a checkpoint "
                f"holds at most {_mib(MAX_CHECKPOINT_BYTES)}"
            )
        if entry.file_size > max(EXPANSION_FLOOR, MAX_EXPANSION * entry.compress_size):
            raise UnsafeContainer(
                f"refused: entry '{entry.filename}' declares {_mib(entry.file_size)} unpacked from "
                f"{entry.compress_size:,} bytes, more than {MAX_EXPANSION}x (a zip bomb)"
            )
    total = sum(entry.file_size for entry in entries)
    if total > MAX_CHECKPOINT_BYTES:
        raise UnsafeContainer(
            f"refused: its {len(entries)} entries declare {_mib(total)} unpacked; a checkpoint holds at "
            f"most {_mib(MAX_CHECKPOINT_BYTES)}"
        )


def _directory_size(handle: BinaryIO, size: int) -> int:
    """The central directory size the archive declares, from the end record zipfile itself picks (the
    last one; its zip64 twin when a locator precedes it, as torch always writes)."""
    tail_start = max(0, size - _END.size - 0xFFFF)  # the end record, then a comment of up to 64 KiB
    handle.seek(tail_start)
    tail = handle.read()
    at = len(tail) - _END.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail.endswith(b"\0\0")):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        raise zipfile.BadZipFile("no zip end record")
    directory: int = _END.unpack_from(tail, at)[5]
    end = tail_start + at
    if end >= _LOCATOR64_SIZE + _END64.size:
        handle.seek(end - _LOCATOR64_SIZE - _END64.size)
        record = handle.read(_END64.size + _LOCATOR64_SIZE)
        if record[_END64.size :].startswith(_LOCATOR64) and record.startswith(b"PK\x06\x06"):
            directory = _END64.unpack_from(record)[8]
    return directory


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB ({size:,} bytes)"
