"""Safe extraction of an uploaded dataset zip (docs/security.md, Dataset uploads).

Nothing in the archive is trusted, its headers least of all:

- Before ``zipfile`` parses anything, the central directory is walked here to
  count its entries: ``zipfile`` builds one object per entry, so a few hundred
  MB of empty members would otherwise cost gigabytes of memory.
- Every name must be a plain relative POSIX path (no ``..``, no absolute path,
  drive letter, backslash or control character) listed once; symlinks and other
  non-regular entries, encrypted members, compression other than stored/deflate
  (``zipfile`` inflates bzip2/LZMA without an output bound) and nested archives
  (by name, and by content: zip, gzip, bzip2, xz, 7z, rar, zstd, tar magic) are
  refused.
- Bytes are counted while they are inflated, in 1 MiB chunks: extraction stops
  as soon as all members together pass ``max_total_bytes`` or one member passes
  ``max_ratio`` × its compressed size (after a 1 MiB grace, so small, very
  compressible files such as blank BMPs pass).
- Files are created with ``O_EXCL | O_NOFOLLOW`` under ``dest`` only, after
  checking the resolved parent folder is inside it.

Problems are collected (up to ``max_problems``) so one answer lists them all;
the resource limits stop extraction at once. The caller owns ``dest`` and
removes it when ``extract_zip`` raises.
"""

import bisect
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from model import DatasetError, unsafe_path_reason

CHUNK = 2**20
ARCHIVE_SUFFIXES = (
    ".zip", ".jar", ".tar", ".tgz", ".gz", ".bz2", ".tbz2", ".xz", ".txz", ".lzma", ".7z",
    ".rar", ".zst", ".lz4", ".z",
)  # fmt: skip
_MAGIC = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"PK\x07\x08", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (257, b"ustar", "tar"),
)
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER_SIZE = 46


@dataclass(frozen=True)
class ArchiveLimits:
    """``max_members``, ``max_total_bytes``: the ``MAX_DATASET_FILES`` and
    ``MAX_DATASET_UNPACKED_MB`` settings; a member may inflate to
    ``max_ratio`` × its compressed size, or ``ratio_grace_bytes``, whichever is more."""

    max_members: int = 50_000
    max_total_bytes: int = 8 * 2**30
    max_ratio: float = 100.0
    ratio_grace_bytes: int = 2**20
    max_central_directory_bytes: int = 64 * 2**20
    max_problems: int = 50


@dataclass(frozen=True)
class Extracted:
    """The regular files written under ``root`` (POSIX paths) and their total size;
    ``exists``/``open`` make it a ``model.training.validation.Files``."""

    root: Path
    files: frozenset[str]
    total_bytes: int

    def exists(self, name: str) -> bool:
        return name in self.files

    def open(self, name: str) -> BinaryIO:
        return (self.root / name).open("rb")


def extract_zip(source: BinaryIO, dest: Path, limits: ArchiveLimits) -> Extracted:
    """Extract the zip ``source`` (seekable) into the existing empty folder ``dest``.

    Raises ``DatasetError`` whose ``problems`` list every refused member (or the
    limit that stopped extraction).
    """
    count_members(source, limits)
    try:
        archive = zipfile.ZipFile(source)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        OSError,
        ValueError,
        EOFError,
    ) as e:
        raise DatasetError(f"the upload is not a readable zip file ({e})") from None
    with archive:
        return _Extraction(archive, dest, limits).run()


def count_members(source: BinaryIO, limits: ArchiveLimits) -> int:
    """Entries in the central directory, found the way ``zipfile`` finds them;
    ``DatasetError`` past ``limits.max_members`` (or when it is no zip)."""
    size = source.seek(0, os.SEEK_END)
    tail_start = max(0, size - _EOCD.size - 2**16)
    source.seek(tail_start)
    tail = source.read()
    found = len(tail) - _EOCD.size  # no archive comment: the record ends the file
    if found < 0 or tail[found : found + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        found = tail.rfind(b"PK\x05\x06")
    if found < 0 or len(tail) - found < _EOCD.size:
        raise DatasetError("the upload is not a zip file (no end of central directory)")
    *_, cd_size, _, _ = _EOCD.unpack_from(tail, found)
    cd_end = tail_start + found
    zip64_start = cd_end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if zip64_start >= 0:
        source.seek(zip64_start)
        record = source.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
        if record[-_ZIP64_LOCATOR.size :][:4] == b"PK\x06\x07" and record[:4] == b"PK\x06\x06":
            cd_size = _ZIP64_EOCD.unpack_from(record)[8]
            cd_end = zip64_start
    if cd_size > cd_end:
        raise DatasetError("the upload is not a readable zip file (bad central directory size)")
    if cd_size > limits.max_central_directory_bytes:
        raise DatasetError(
            f"the zip's central directory is {cd_size} bytes; "
            f"at most {limits.max_central_directory_bytes} are accepted"
        )
    source.seek(cd_end - cd_size)
    directory = source.read(cd_size)
    count = offset = 0
    while offset < len(directory):
        header = directory[offset : offset + _CENTRAL_HEADER_SIZE]
        if len(header) < _CENTRAL_HEADER_SIZE or header[:4] != b"PK\x01\x02":
            raise DatasetError("the upload is not a readable zip file (bad central directory)")
        lengths = struct.unpack_from("<3H", header, 28)  # name, extra field, comment
        offset += _CENTRAL_HEADER_SIZE + sum(lengths)
        count += 1
        if count > limits.max_members:
            raise DatasetError(
                "the dataset was rejected",
                [
                    f"the zip holds more than {limits.max_members} entries "
                    "(MASKRCNN_MAX_DATASET_FILES)"
                ],
            )
    source.seek(0)
    return count


def archive_kind(head: bytes) -> str | None:
    """The archive format ``head`` (a file's first bytes) starts like, or ``None``."""
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return "bzip2"
    return None


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member may not be extracted, judged from its central directory entry."""
    is_dir = info.filename.endswith("/")
    reason = unsafe_path_reason(info.filename[:-1] if is_dir else info.filename)
    if reason:
        return reason
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "a symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "not a regular file"
    if is_dir:
        return None
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"compression method {info.compress_type}; only stored and deflate are accepted"
    if info.filename.lower().endswith(ARCHIVE_SUFFIXES):
        return "an archive inside the archive (by its name); unpack it into the zip instead"
    return None


class _Limit(Exception):
    """A resource limit was passed: stop extracting."""


class _Extraction:
    def __init__(self, archive: zipfile.ZipFile, dest: Path, limits: ArchiveLimits):
        self.archive, self.dest, self.limits = archive, dest, limits
        self.root = dest.resolve()
        self.problems: list[str] = []
        self.files: set[str] = set()
        self.total = 0
        # where each member's data must end: the next header, the central directory
        # or the end of the file, whatever compressed size the directory claims
        starts = {info.header_offset for info in archive.infolist()} | {archive.start_dir}
        self.boundaries = sorted(starts | {archive.fp.seek(0, os.SEEK_END)})

    def run(self) -> Extracted:
        try:
            for info in self._screen():
                self._extract(info)
        except _Limit:
            pass
        if self.problems:
            raise DatasetError("the dataset was rejected", self.problems)
        return Extracted(self.dest, frozenset(self.files), self.total)

    def _problem(self, problem: str, *, stop: bool = False) -> None:
        self.problems.append(problem)
        if stop:
            raise _Limit
        if len(self.problems) >= self.limits.max_problems:
            self.problems.append(f"(stopped looking after {self.limits.max_problems} problems)")
            raise _Limit

    def _screen(self) -> list[zipfile.ZipInfo]:
        """The file members that may be extracted; a problem for every other one."""
        seen: set[str] = set()
        safe = []
        for info in self.archive.infolist():
            problem = member_problem(info)
            if problem is None and info.filename in seen:
                problem = "listed twice"
            seen.add(info.filename)
            if problem:
                self._problem(f"{info.filename!r}: {problem}")
            elif not info.filename.endswith("/"):
                safe.append(info)
        return safe

    def _extract(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        target = self.dest.joinpath(*name.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(self.root):
                raise OSError(f"{target.parent} is outside {self.root}")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            self._problem(f"{name!r}: cannot be extracted ({e.strerror or e})")
            return
        try:
            with os.fdopen(fd, "wb") as out, self.archive.open(info) as member:
                self._copy(info, member, out)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            self._problem(f"{name!r}: corrupt data ({e})")
        except NotImplementedError as e:  # zipfile: patched data, strong encryption...
            self._problem(f"{name!r}: not supported ({e})")

    def _compressed_bytes(self, info: zipfile.ZipInfo) -> int:
        """The compressed size ``info`` claims, but no more than the bytes between its
        header and the next boundary: a larger claim would loosen the ratio bound."""
        after = bisect.bisect_right(self.boundaries, info.header_offset)
        end = self.boundaries[min(after, len(self.boundaries) - 1)]
        return min(info.compress_size, max(0, end - info.header_offset))

    def _copy(self, info: zipfile.ZipInfo, member: BinaryIO, out: BinaryIO) -> None:
        written = 0
        compressed = self._compressed_bytes(info)
        bound = max(self.limits.ratio_grace_bytes, self.limits.max_ratio * compressed)
        while chunk := member.read(CHUNK):
            if written == 0 and (kind := archive_kind(chunk[:512])):
                self._problem(f"{info.filename!r}: an archive inside the archive ({kind} data)")
                return
            written += len(chunk)
            self.total += len(chunk)
            if self.total > self.limits.max_total_bytes:
                self._problem(
                    f"the files unpack to more than {self.limits.max_total_bytes} bytes "
                    "(MASKRCNN_MAX_DATASET_UNPACKED_MB)",
                    stop=True,
                )
            if written > bound:
                self._problem(
                    f"{info.filename!r}: inflates to more than {self.limits.max_ratio:g}× its "
                    f"{compressed} compressed bytes (a zip bomb?)",
                    stop=True,
                )
            out.write(chunk)
        self.files.add(info.filename)
