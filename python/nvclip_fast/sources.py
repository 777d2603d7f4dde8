"""Where images come from for ``nvclip-fast embed``: files, directories, ``@lists`` and tar shards.

Every input becomes a stream of :class:`Source` items in a deterministic order, each with an ``id``
and a way to read its bytes. Inputs that cannot even be listed (a missing path, a named pipe, an
unreadable tar) become items whose ``error`` says why, so they are reported with the other bad
inputs instead of stopping the job. Only regular files are ever opened, and they are opened
non-blocking: a named pipe, a socket or a device in a folder is listed as skipped with its kind,
never read, so no read can wait forever.

Ids
---
An id names one input losslessly, as text that any output (Parquet, JSON) stores: two different
inputs never share an id, and :func:`parse_id` / :func:`read_id` turn an id back into what to open.

- A file: its path as given (paths read from an ``@list`` are normalized: ``lists/../photos/x.jpg``
  is ``photos/x.jpg``).
- A tar member: ``<tar path>::<member name>``; the k-th member of the same name in one shard (k >= 2)
  is ``<tar path>::<member name>::<k>``.
- Escapes, so that any name round-trips: a backslash is written ``\\\\``; a byte of a name that is not
  valid UTF-8 is written ``\\xHH`` (two lowercase hex digits); a colon that is the first or last
  character of a path or member name, or next to another colon, is written ``\\:``. Other characters,
  newlines included, are stored as they are. Almost every real path needs no escape, and its id is
  the path itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TAR_MEMBER_SEPARATOR = "::"
LIST_PREFIX = "@"
ESCAPE = "\\"
# The largest file read as one image: far above any image Pillow decodes within its pixel limit
# (an uncompressed 16-bit RGBA TIFF at Image.MAX_IMAGE_PIXELS is 716 MB); a larger file is refused
# unread rather than loaded whole into memory.
MAX_FILE_BYTES = 1 << 30

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
# What is not a regular file, as stat tells it.
_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class NotAnImageSource(OSError):
    """A path that cannot be read as an image file: not a regular file, or too large."""


@dataclass(frozen=True, slots=True)
class Source:
    """One image to embed: a file (``path``) or a tar member (``path`` of the shard, and the member's
    data ``offset`` and ``size``); or one input that failed before it could be read (``error``)."""

    id: str
    path: str = ""
    offset: int = -1
    size: int = -1
    error: str | None = None

    def read(self) -> bytes:
        """The bytes of the file or tar member (OSError or NotAnImageSource when they cannot be read)."""
        if self.offset < 0:
            return read_file(self.path)
        with open_regular(self.path) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member: {len(data)} of {self.size} bytes")
        return data


# ---------------------------------------------------------------------------------------------------
# Ids


def _escape(name: str) -> str:
    """A path or member name (a str as os gives it: undecodable bytes as surrogate escapes) as id text."""
    try:
        name.encode("utf-8")
        plain = ESCAPE not in name and ":" not in name
    except UnicodeEncodeError:
        plain = False
    if plain:
        return name
    raw = os.fsencode(name).decode("utf-8", "surrogateescape")  # any other lone surrogate raises here
    out = []
    last = len(raw) - 1
    for i, ch in enumerate(raw):
        if ch == ESCAPE:
            out.append(ESCAPE * 2)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"{ESCAPE}x{ord(ch) - 0xDC00:02x}")
        elif ch == ":" and (i in (0, last) or raw[i - 1] == ":" or raw[i + 1] == ":"):
            out.append(ESCAPE + ":")
        else:
            out.append(ch)
    return "".join(out)


def source_id(path: str | os.PathLike[str], member: str | None = None, occurrence: int = 1) -> str:
    """The id of a file, or of the ``occurrence``-th member named ``member`` of the tar shard ``path``."""
    text = _escape(os.fspath(path))
    if member is None:
        return text
    text += TAR_MEMBER_SEPARATOR + _escape(member)
    return text if occurrence == 1 else f"{text}{TAR_MEMBER_SEPARATOR}{occurrence}"


@dataclass(frozen=True)
class ParsedId:
    """What an id names: the file ``path`` (bytes, as the file system takes them), and for a tar
    member its ``member`` name (bytes) and ``occurrence`` among members of that name (1 = first)."""

    path: bytes
    member: bytes | None = None
    occurrence: int = 1


def parse_id(image_id: str) -> ParsedId:
    """The inverse of :func:`source_id`; ValueError for text that no source has as its id."""
    parts: list[bytearray] = [bytearray()]
    i, n = 0, len(image_id)
    while i < n:
        ch = image_id[i]
        if ch == ESCAPE:
            code = image_id[i + 1 : i + 2]
            if code in (ESCAPE, ":"):
                parts[-1] += code.encode()
                i += 2
            elif code == "x" and len(hex_digits := image_id[i + 2 : i + 4]) == 2:
                try:
                    parts[-1].append(int(hex_digits, 16))
                except ValueError:
                    raise ValueError(f"id {image_id!r}: bad escape {image_id[i : i + 4]!r}") from None
                i += 4
            else:
                raise ValueError(f"id {image_id!r}: bad escape {image_id[i : i + 2]!r} at {i}")
        elif image_id.startswith(TAR_MEMBER_SEPARATOR, i):
            parts.append(bytearray())
            i += len(TAR_MEMBER_SEPARATOR)
        else:
            try:
                parts[-1] += ch.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"id {image_id!r}: a lone surrogate at {i}") from None
            i += 1
    if len(parts) == 1:
        return ParsedId(bytes(parts[0]))
    occurrence = 1
    if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) >= 2:
        occurrence = int(parts[2])
    elif len(parts) != 2:
        raise ValueError(f"id {image_id!r}: expected PATH or TAR::MEMBER[::N]")
    return ParsedId(bytes(parts[0]), bytes(parts[1]), occurrence)


def read_id(
    image_id: str, root: str | os.PathLike[str] | None = None, max_bytes: int = MAX_FILE_BYTES
) -> bytes:
    """The bytes an id names (a file, or a tar shard's member), read the way a job reads them: only
    regular files, never blocking; a relative path is relative to ``root`` (default: the working
    directory). FileNotFoundError when the file or member is gone, NotAnImageSource (an OSError)
    for what is not a regular file or is over ``max_bytes``, ValueError for a malformed id."""
    parsed = parse_id(image_id)
    path = parsed.path
    if root is not None and not os.path.isabs(path):
        path = os.path.join(os.fsencode(root), path)
    try:
        if parsed.member is None:
            return read_file(path, max_bytes)
        members = _tar_index(os.fsdecode(path), *_stat_key(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{image_id!r}: no such file") from None
    source = members.get((parsed.member, parsed.occurrence))
    if source is None:
        member = os.fsdecode(parsed.member)
        raise FileNotFoundError(f"{image_id!r}: no member {member!r} in {os.fsdecode(path)!r}")
    if source.size > max_bytes:
        raise NotAnImageSource(
            f"{image_id!r}: a member of {source.size} bytes, over the limit of {max_bytes}"
        )
    return source.read()


def _stat_key(path: bytes) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _tar_index(path: str, size: int, mtime_ns: int) -> dict[tuple[bytes, int], Source]:
    """{(member name, occurrence): source} of a shard, cached per (path, size, mtime)."""
    return {
        (os.fsencode(member), occurrence): source
        for member, occurrence, source in _tar_entries(Path(path))
        if source.error is None
    }


# ---------------------------------------------------------------------------------------------------
# Reading regular files only, never blocking


def _kind(mode: int) -> str | None:
    """What a stat mode is when it is not a regular file ("a named pipe (FIFO)", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


@contextlib.contextmanager
def open_regular(path: str | bytes | os.PathLike[str]) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file: opened non-blocking (opening a FIFO
    never waits for a writer), then checked with fstat, so that a file swapped for a pipe or a
    device after it was listed is refused too (NotAnImageSource), never read."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotAnImageSource(f"not a regular file: {kind}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_file(path: str | bytes | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes (see :func:`open_regular`); NotAnImageSource over ``limit`` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise NotAnImageSource(f"a file of {size} bytes, over the limit of {limit} for one image")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotAnImageSource(f"a file that grew past the limit of {limit} bytes while read")
    return data


def has_image_signature(head: bytes) -> bool:
    return any(head[offset : offset + len(sig)] == sig for offset, sig in _SIGNATURES)


def _looks_like_image(path: str) -> bool:
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open_regular(path) as f:
            return has_image_signature(f.read(_SIGNATURE_BYTES))
    except (OSError, NotAnImageSource):
        return False  # unreadable and not named as an image: not ours to report


def _missing(path: str, listed: bool) -> str:
    """Why a path that cannot be stat'ed is not an input."""
    where = " (listed)" if listed else ""
    if os.path.islink(path):
        return f"broken symbolic link{where}"
    return f"no such file or directory{where}"


# ---------------------------------------------------------------------------------------------------
# Folders, shards, lists


def _scan_directory(root: str) -> Iterator[Source]:
    """Image files under ``root``, recursively, in sorted order: a folder's own files, then its
    sub-folders, depth first (symbolic links to folders are not followed). Regular files are taken
    by extension or signature; every other entry that is not a folder (a named pipe, a socket, a
    device, a broken link) is listed as skipped with its kind, unopened. A folder that cannot be
    listed is an error item."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield Source(source_id(root), error=f"unreadable directory: {e.strerror or e}")
        return
    folders = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
                continue
            mode = entry.stat().st_mode  # follows a symbolic link to what it names
        except FileNotFoundError:
            if entry.is_symlink():
                yield Source(source_id(entry.path), error="skipped: broken symbolic link")
            continue  # otherwise removed while listed
        except OSError as e:
            yield Source(source_id(entry.path), error=f"cannot stat: {e.strerror or e}")
            continue
        kind = _kind(mode)
        if stat.S_ISDIR(mode):
            continue  # a symbolic link to a folder: not followed
        if kind is not None:
            yield Source(source_id(entry.path), error=f"skipped: {kind}")
        elif entry.name.lower().endswith(_TAR_SUFFIXES):
            yield from _tar_members(Path(entry.path))
        elif _looks_like_image(entry.path):
            yield Source(source_id(entry.path), entry.path)
    for folder in folders:
        yield from _scan_directory(folder)


def _tar_entries(path: Path) -> Iterator[tuple[str, int, Source]]:
    """(member name, occurrence, source) of every image member of a tar shard, in archive order,
    then one error item if the shard breaks part way."""
    members: list[tarfile.TarInfo] = []
    error = None
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while (member := tar.next()) is not None:  # headers only; data is read per member, by offset
                members.append(member)
    except (OSError, EOFError, tarfile.TarError, NotAnImageSource) as e:
        error = Source(source_id(path), error=f"unreadable tar shard after {len(members)} members: {e}")
    seen: dict[str, int] = {}
    for member in members:
        if member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS:
            occurrence = seen[member.name] = seen.get(member.name, 0) + 1
            member_id = source_id(path, member.name, occurrence)
            yield member.name, occurrence, Source(member_id, os.fspath(path), member.offset_data, member.size)
    if error is not None:
        yield "", 0, error


def _tar_members(path: Path) -> Iterator[Source]:
    """The image members of a tar shard (webdataset layout: ``<key>.<ext>`` members grouped by key),
    in archive order; non-image members (captions, json) are skipped. Listing reads only the
    headers, so a big shard costs little until used. A member name repeated in one shard is a
    member of its own (``::2``, ``::3``, ...). A shard that breaks part way yields the members before
    the break, then one error item."""
    for _, _, source in _tar_entries(path):
        yield source


def _normalized(listed: str) -> str:
    """A listed path with ``.`` and ``..`` removed, where that still names the same file (a ``..``
    after a symbolic link to a folder does not; then the path stays as listed)."""
    normal = os.path.normpath(listed)
    if normal == listed:
        return listed
    try:
        return normal if os.path.samefile(normal, listed) else listed
    except OSError:
        exists = os.path.lexists(normal) or os.path.lexists(listed)
        return listed if exists else normal


def _list_file(path: str) -> Iterator[Source]:
    """``@list.txt``: one path per line (relative paths are relative to the list's directory);
    blank lines and lines starting with ``#`` are skipped. Listed paths are taken as images even
    without an image extension: one that is not decodable is reported."""
    try:
        lines = read_file(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError, NotAnImageSource) as e:
        yield Source(f"{LIST_PREFIX}{source_id(path)}", error=f"unreadable list file: {e}")
        return
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        listed = entry if os.path.isabs(entry) else os.path.join(os.path.dirname(path), entry)
        yield from _explicit(_normalized(listed), listed=True)


def _explicit(path: str, *, listed: bool = False) -> Iterator[Source]:
    """A path given explicitly (or listed): a folder is scanned, a ``.tar`` file read as a shard,
    any other regular file taken whatever its name; anything else is an error item saying what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        yield Source(source_id(path), error=_missing(path, listed))
        return
    except OSError as e:
        yield Source(source_id(path), error=f"cannot stat: {e.strerror or e}")
        return
    if stat.S_ISDIR(mode):
        yield from _scan_directory(path)
    elif (kind := _kind(mode)) is not None:
        yield Source(source_id(path), error=f"not a regular file: {kind}")
    elif path.lower().endswith(_TAR_SUFFIXES):
        yield from _tar_members(Path(path))
    else:
        yield Source(source_id(path), path)


def iter_sources(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Iterator[Source]:
    """Every image named by ``inputs`` (files, directories, ``@list.txt``, ``.tar`` shards), in order.

    ``inputs`` is one path (str or PathLike) or an iterable of them. A path given explicitly (or
    listed) is always an item, whatever its name; a directory scan takes only files that look like
    images (extension or signature) and ignores the rest.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    elif isinstance(inputs, (bytes, bytearray)):
        raise TypeError("inputs: expected a path (str or os.PathLike) or an iterable of paths, got bytes")
    for item in inputs:
        text = os.fspath(item)
        if not isinstance(text, str):
            raise TypeError(f"inputs: expected str or os.PathLike paths, got {type(item).__name__}")
        if text.startswith(LIST_PREFIX):
            yield from _list_file(text[len(LIST_PREFIX) :])
        else:
            yield from _explicit(os.fspath(Path(text)) if text else text)
