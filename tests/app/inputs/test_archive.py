"""Safe zip extraction: every refused kind of member, the limits counted while
inflating, and nothing written outside the destination folder."""

import contextlib
import gzip
import io
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.inputs.archive import ArchiveLimits, count_members, extract_zip
from model.errors import DatasetError

SMALL = ArchiveLimits(max_members=20, max_total_bytes=4 * 2**20, ratio_grace_bytes=2**16)


def make_zip(*members, comment: bytes = b"") -> io.BytesIO:
    """``members``: ``(name or ZipInfo, bytes)``; stored unless the ZipInfo says otherwise."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.comment = comment
    buffer.seek(0)
    return buffer


def special(name: str, mode: int, data: bytes = b"") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    return info, data


def deflated(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


@pytest.fixture
def dest(tmp_path) -> Path:
    """An empty folder two levels below ``tmp_path``: ``../`` escapes would land in it."""
    folder = tmp_path / "outer" / "dest"
    folder.mkdir(parents=True)
    return folder


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def rejected(source, dest, limits=SMALL) -> list[str]:
    with pytest.raises(DatasetError) as error:
        extract_zip(source, dest, limits)
    return error.value.problems or [str(error.value)]


def test_plain_members_are_extracted_byte_for_byte(dest):
    source = make_zip(("annotations.json", b"{}"), ("images/a/1.png", b"x" * 1000), ("d/", b""))
    extracted = extract_zip(source, dest, SMALL)
    assert extracted.files == {"annotations.json", "images/a/1.png"}
    assert extracted.total_bytes == 1002
    assert (dest / "images/a/1.png").read_bytes() == b"x" * 1000
    assert not (dest / "d").exists()  # folders come with the files they hold
    with extracted.open("annotations.json") as f:
        assert f.read() == b"{}"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "'..' in the path"),
        ("images/../../evil.txt", "'..' in the path"),
        ("/tmp/evil.txt", "an absolute path"),
        ("C:/evil.txt", "a drive letter"),
        ("..\\evil.txt", "a backslash"),
        ("images\\evil.txt", "a backslash"),
        ("images/./evil.txt", "an empty or '.' part"),
        ("images//evil.txt", "an empty or '.' part"),
        ("bad\x1bname.txt", "a control character"),
        ("a" * 300, "longer than"),
    ],
)
def test_unsafe_names_are_refused_and_nothing_escapes(tmp_path, dest, name, reason):
    source = make_zip(("annotations.json", b"{}"), (name, b"evil"))
    problems = rejected(source, dest)
    assert len(problems) == 1 and reason in problems[0] and repr(name) in problems[0]
    assert files_under(tmp_path) == {"outer/dest/annotations.json"}  # the caller removes it


def test_symlinks_and_other_special_entries_are_refused(tmp_path, dest):
    source = make_zip(
        special("images/link.png", stat.S_IFLNK | 0o777, b"../../../etc/passwd"),
        special("images/fifo", stat.S_IFIFO | 0o644),
        special("images/dev", stat.S_IFCHR | 0o644),
        special("images/ok.png", stat.S_IFREG | 0o644, b"fine"),
    )
    problems = rejected(source, dest)
    assert problems == [
        "'images/link.png': a symbolic link",
        "'images/fifo': not a regular file",
        "'images/dev': not a regular file",
    ]
    assert not (dest / "images/link.png").exists() and not (dest / "images/link.png").is_symlink()
    assert files_under(tmp_path) == {"outer/dest/images/ok.png"}


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("x.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("images/inner.zip", b"anything", "by its name"),
        ("images/inner.tar.gz", b"anything", "by its name"),
        ("images/0.png", make_zip(("x", b"x")).getvalue(), "(zip data)"),
        ("images/0.png", gzip.compress(b"x"), "(gzip data)"),
        ("images/0.png", tar_bytes(), "(tar data)"),
        ("images/0.png", b"BZh91AY&SY" + bytes(20), "(bzip2 data)"),
        ("images/0.png", b"7z\xbc\xaf\x27\x1c" + bytes(20), "(7z data)"),
    ],
)
def test_nested_archives_are_refused_by_name_and_by_content(dest, name, data, reason):
    problems = rejected(make_zip((name, data)), dest)
    assert len(problems) == 1 and "an archive inside the archive" in problems[0]
    assert reason in problems[0]


def test_duplicate_names_are_refused(dest):
    with pytest.warns(UserWarning, match="Duplicate name"):
        source = make_zip(("a.png", b"1"), ("a.png", b"2"))
    assert rejected(source, dest) == ["'a.png': listed twice"]


def mark_encrypted(source: io.BytesIO) -> io.BytesIO:
    """Set the 'encrypted' flag of the first member (zipfile cannot write one)."""
    data = bytearray(source.getvalue())
    data[6] |= 0x1  # local header flags
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1
    return io.BytesIO(bytes(data))


def test_encrypted_and_bzip2_members_are_refused(dest):
    bzip2 = zipfile.ZipInfo("bomb.bin")
    bzip2.compress_type = zipfile.ZIP_BZIP2  # zipfile inflates bzip2 with no output bound
    source = mark_encrypted(make_zip(("secret.png", b"x"), (bzip2, bytes(2**20))))
    problems = rejected(source, dest)
    assert problems == [
        "'secret.png': encrypted",
        "'bomb.bin': compression method 12; only stored and deflate are accepted",
    ]


def patch_central(source: io.BytesIO, offset: int, fmt: str, value: int) -> io.BytesIO:
    """Overwrite a field of the first central directory entry (local headers untouched)."""
    data = bytearray(source.getvalue())
    struct.pack_into(fmt, data, data.index(b"PK\x01\x02") + offset, value)
    return io.BytesIO(bytes(data))


def test_features_zipfile_does_not_implement_are_refused_not_crashed_on(dest):
    """``zipfile`` raises ``NotImplementedError`` (no ``BadZipFile``) for these."""
    needs_version_99 = patch_central(make_zip(("a.png", b"x")), 6, "<H", 99)
    with pytest.raises(DatasetError, match=r"not a readable zip file \(zip file version 9\.9\)"):
        extract_zip(needs_version_99, dest, SMALL)
    for flag, feature in ((0x20, "compressed patched data"), (0x40, "strong encryption")):
        source = patch_central(make_zip(("a.png", b"x"), ("b.png", b"y")), 8, "<H", flag)
        (folder := dest / feature).mkdir()
        problems = rejected(source, folder)
        assert len(problems) == 1 and problems[0].startswith("'a.png': not supported (")
        assert feature in problems[0]


def test_problems_are_collected_up_to_the_limit(dest):
    names = [f"../evil{i}.txt" for i in range(10)]
    problems = rejected(make_zip(*[(n, b"x") for n in names]), dest)
    assert len(problems) == 10 and all("'..' in the path" in p for p in problems)
    limited = ArchiveLimits(max_problems=3)
    problems = rejected(make_zip(*[(n, b"x") for n in names]), dest, limited)
    assert problems[:3] == [f"'../evil{i}.txt': '..' in the path" for i in range(3)]
    assert problems[3] == "(stopped looking after 3 problems)"


def test_member_count_is_checked_before_zipfile_parses_the_directory(dest):
    source = make_zip(*[(f"{i}.txt", b"") for i in range(21)])
    assert rejected(source, dest) == [
        "the zip holds more than 20 entries (MASKRCNN_MAX_DATASET_FILES)"
    ]
    assert not any(dest.iterdir())


def test_member_count_agrees_with_zipfile(tmp_path):
    cases = [
        make_zip(),
        make_zip(*[(f"d/{i}", b"x" * i) for i in range(7)], comment=b"c" * 65_535),
        io.BytesIO(b"prefix" * 100 + make_zip(("a", b"1"), ("b", b"2")).getvalue()),
    ]
    for source in cases:
        expected = len(zipfile.ZipFile(source).infolist())
        assert count_members(source, ArchiveLimits()) == expected


def test_oversized_central_directory_is_refused(dest):
    source = make_zip(*[(f"{i:0>200}", b"") for i in range(5)])
    limits = ArchiveLimits(max_central_directory_bytes=1000)
    with pytest.raises(DatasetError, match=r"central directory is 1[0-9]{3} bytes; at most 1000"):
        extract_zip(source, dest, limits)


@pytest.mark.parametrize(
    "data", [b"", b"not a zip at all", b"PK\x05\x06" + bytes(10), b"PK\x03\x04" + bytes(100)]
)
def test_non_zips_are_refused(dest, data):
    with pytest.raises(DatasetError, match=r"not a (readable )?zip file"):
        extract_zip(io.BytesIO(data), dest, SMALL)


def test_compression_ratio_stops_a_bomb_after_the_grace(tmp_path, dest):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, archive.open(deflated("zeros.bin"), "w") as f:
        for _ in range(64):
            f.write(bytes(2**20))  # 64 MiB of zeros, ~64 KB deflated
    problems = rejected(buffer, dest, ArchiveLimits(max_ratio=10, ratio_grace_bytes=2**20))
    assert len(problems) == 1
    assert problems[0].startswith("'zeros.bin': inflates to more than 10× its ")
    assert (dest / "zeros.bin").stat().st_size <= 2**20  # stopped, not written out


def test_a_compressed_size_that_lies_does_not_loosen_the_ratio(dest):
    """The ratio bound must come from the bytes a member really has, not from the
    compressed size its central directory entry claims: here it claims the whole
    archive (the padding member behind it gives the inflater the bytes to read)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open(deflated("zeros.bin"), "w") as f:
            for _ in range(32):
                f.write(bytes(2**20))  # 32 MiB of zeros, ~32 KB deflated
        archive.writestr("pad.bin", bytes(range(256)) * 4500)  # ~1.1 MiB, stored
    claimed = len(buffer.getvalue())
    source = patch_central(buffer, 20, "<L", claimed)
    problems = rejected(source, dest, ArchiveLimits(max_ratio=10, ratio_grace_bytes=2**16))
    assert len(problems) == 1 and problems[0].startswith("'zeros.bin': "), problems
    assert str(claimed) not in problems[0]
    assert not (dest / "zeros.bin").exists() or (dest / "zeros.bin").stat().st_size <= 2**20


def test_total_size_is_counted_while_extracting(dest):
    members = [(f"{i}.bin", bytes(range(256)) * 4096) for i in range(8)]  # 1 MiB each, stored
    problems = rejected(make_zip(*members), dest, ArchiveLimits(max_total_bytes=3 * 2**20))
    assert problems == [
        f"the files unpack to more than {3 * 2**20} bytes (MASKRCNN_MAX_DATASET_UNPACKED_MB)"
    ]
    assert sum(p.stat().st_size for p in dest.iterdir()) <= 3 * 2**20  # the 4th stopped
    assert not (dest / "4.bin").exists()


def test_corrupt_member_data_is_a_problem(dest):
    data = make_zip(("a.txt", b"hello world, hello world")).getvalue()
    corrupt = io.BytesIO(data.replace(b"hello world, hello", b"HELLO world, hello"))
    problems = rejected(corrupt, dest)
    assert len(problems) == 1 and problems[0].startswith("'a.txt': corrupt data (Bad CRC-32")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.text(alphabet="./\\a:b", min_size=1, max_size=12), max_size=4))
def test_any_names_stay_inside_or_are_refused(tmp_path_factory, names):
    root = tmp_path_factory.mktemp("fuzz")
    dest = root / "x" / "dest"
    dest.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        source = make_zip(*[(n, b"data") for n in names])
    with contextlib.suppress(DatasetError):
        extract_zip(source, dest, SMALL)
    for path in root.rglob("*"):
        assert path in (root / "x", dest) or path.resolve().is_relative_to(dest.resolve())
        assert not path.is_symlink()
