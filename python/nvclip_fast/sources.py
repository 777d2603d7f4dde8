"""Where images come from for ``nvclip-fast embed``: files, directories, ``@lists`` and tar shards.

Every input becomes a stream of :class:`Source` items in a deterministic order, each with a stable
``id`` (the file path, or ``<tar path>::<member name>`` for a tar member) and a way to read its bytes.
Inputs that cannot even be listed (a missing path, an unreadable tar) become items whose ``error`` is
set, so they are reported with the other bad inputs instead of stopping the job.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TAR_MEMBER_SEPARATOR = "::"
LIST_PREFIX = "@"

# Extensions that name an image type Pillow decodes; a directory scan also takes files with other
# names whose first bytes are an image signature.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".jp2",
        ".j2k",
        ".avif",
        ".heic",
        ".qoi",
    }
)
# (offset, signature) of the image formats above; enough bytes are read to cover the longest.
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG\r\n\x1a\n"),  # PNG
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"BM"),  # BMP
    (0, b"II*\x00"),  # TIFF, little endian
    (0, b"MM\x00*"),  # TIFF, big endian
    (8, b"WEBP"),  # RIFF....WEBP
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),  # JPEG 2000
    (4, b"ftypavif"),
    (4, b"ftypheic"),
    (0, b"qoif"),
)
_SIGNATURE_BYTES = max(offset + len(sig) for offset, sig in _SIGNATURES)
_TAR_SUFFIXES = (".tar",)


@dataclass(frozen=True)
class Source:
    """One image to embed (or one input that failed before it could be read: ``error`` set)."""

    id: str
    read: Callable[[], bytes] | None = None
    error: str | None = None


def has_image_signature(head: bytes) -> bool:
    return any(head[offset : offset + len(sig)] == sig for offset, sig in _SIGNATURES)


def _is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return has_image_signature(f.read(_SIGNATURE_BYTES))
    except OSError:
        return False  # unreadable and not named as an image: not ours to report


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def source_id(path: str | os.PathLike[str]) -> str:
    """A path as an id that any output can store: file names that are not valid UTF-8 (which os
    gives as surrogate escapes) get their undecodable bytes as backslash escapes instead."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _scan_directory(root: Path) -> Iterator[Source]:
    """Image files under ``root``, recursively, in sorted order: a folder's own files, then its
    sub-folders, depth first. A folder that cannot be listed is an error item."""
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append, followlinks=False):
        while unreadable:
            e = unreadable.pop(0)
            yield Source(source_id(e.filename or dirpath), error=f"unreadable directory: {e.strerror or e}")
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.lower().endswith(_TAR_SUFFIXES):
                yield from _tar_members(path)
            elif _is_image_file(path):
                yield Source(source_id(path), _file_reader(path))
    for e in unreadable:  # the root itself, or the last folder listed
        yield Source(source_id(e.filename or root), error=f"unreadable directory: {e.strerror or e}")


def _tar_members(path: Path) -> Iterator[Source]:
    """The image members of a tar shard (webdataset layout: ``<key>.<ext>`` members grouped by key),
    in archive order; non-image members (captions, json) are skipped. Listing reads only the
    headers (the data is read per member, by offset), so a big shard costs little until used. A
    shard that breaks part way yields the members before the break, then one error item."""
    members: list[tarfile.TarInfo] = []
    error = None
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members can be read by offset
            while (member := tar.next()) is not None:
                members.append(member)
    except (OSError, EOFError, tarfile.TarError) as e:
        error = Source(source_id(path), error=f"unreadable tar shard after {len(members)} members: {e}")
    for member in members:
        if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
            member_id = f"{source_id(path)}{TAR_MEMBER_SEPARATOR}{source_id(member.name)}"
            yield Source(member_id, _slice_reader(path, member))
    if error is not None:
        yield error


def _slice_reader(path: Path, member: tarfile.TarInfo) -> Callable[[], bytes]:
    offset, size = member.offset_data, member.size

    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"truncated tar member: {len(data)} of {size} bytes")
        return data

    return read


def _list_file(path: Path) -> Iterator[Source]:
    """``@list.txt``: one path per line (relative paths are relative to the list's directory);
    blank lines and lines starting with ``#`` are skipped. Listed paths are taken as images even
    without an image extension: one that is not decodable is reported."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        yield Source(f"{LIST_PREFIX}{source_id(path)}", error=f"unreadable list file: {e}")
        return
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        listed = Path(entry) if os.path.isabs(entry) else path.parent / entry
        yield from _explicit(listed, from_list=True)


def _explicit(path: Path, *, from_list: bool = False) -> Iterator[Source]:
    if path.is_dir():
        yield from _scan_directory(path)
    elif str(path).lower().endswith(_TAR_SUFFIXES) and path.is_file():
        yield from _tar_members(path)
    elif path.is_file() or path.is_symlink():
        yield Source(source_id(path), _file_reader(path))
    else:
        where = " (listed)" if from_list else ""
        yield Source(source_id(path), error=f"no such file or directory{where}")


def iter_sources(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Source]:
    """Every image named by ``inputs`` (files, directories, ``@list.txt``, ``.tar`` shards), in order.

    A path given explicitly (or listed) is always an item, whatever its name; a directory scan takes
    only files that look like images (extension or signature) and ignores the rest.
    """
    for item in inputs:
        text = os.fspath(item)
        if text.startswith(LIST_PREFIX):
            yield from _list_file(Path(text[len(LIST_PREFIX) :]))
        else:
            yield from _explicit(Path(text))
