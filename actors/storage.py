"""Files of a run, on a local disk or on storage every node of a cluster can reach.

Every location is a string: a local path (``runs/eval``, ``/mnt/nfs/runs/eval``) or a URI that
``pyarrow.fs`` understands (``s3://bucket/runs/eval``, ``gs://bucket/...``, ``file:///abs``).
Writers here are atomic: on a local or network file system the data goes to a hidden temporary
file that is then renamed (a reader never sees half a file, a crash leaves the previous
version); on an object store a single PUT is atomic by itself.

Models and adapters are read by libraries that need a local directory (transformers, peft,
vLLM): ``local_copy`` downloads a remote directory once into ``actors.settings.cache_dir()``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

from actors.errors import UserError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(UserError):
    """A storage location that cannot be reached, read or written; the message names it."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return bool(_SCHEME.match(str(location)))


def is_local(location: str | Path) -> bool:
    """True for a path or ``file://`` URI on this machine's file system."""
    return not is_uri(location) or str(location).startswith("file://")


def join(location: str | Path, *parts: str) -> str:
    """``location`` with ``parts`` appended (``/`` for URIs, the OS separator for paths)."""
    if is_uri(location):
        # options of the file system (s3://b/p?endpoint_override=...) stay at the end
        base, question, query = str(location).partition("?")
        return posixpath.join(base.rstrip("/"), *parts) + question + query
    return str(Path(location, *parts))


def basename(location: str | Path) -> str:
    """The last part of a location's path (a URI's file-system options left out)."""
    return posixpath.basename(str(location).partition("?")[0].rstrip("/")) if is_uri(location) else Path(location).name


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a location; errors name the location."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise StorageError(f"storage {str(location)!r}: {err}") from err


def exists(location: str | Path) -> bool:
    """True when a file or directory exists at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    """True when a file exists at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def make_dirs(location: str | Path) -> None:
    """Create the directory ``location`` (and its parents); a no-op on object stores."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def list_files(location: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files directly under ``location`` (or below it) whose names end with ``suffix``, sorted,
    as locations of the same kind; hidden names (``.``) are skipped. A missing directory is empty."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    found = []
    for info in infos:
        relative = posixpath.relpath(info.path, path)
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        found.append(join(location, *Path(relative).parts))
    return sorted(found)


def read_bytes(location: str | Path) -> bytes:
    """The bytes of the file at ``location``."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise StorageError(f"{location}: no such file") from err


def read_text(location: str | Path) -> str:
    """The UTF-8 text of the file at ``location``."""
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write ``data`` to ``location`` atomically (see module doc); returns the location."""
    fs, path = filesystem(location)
    parent = os.path.dirname(path) if is_local(location) else posixpath.dirname(path)
    if is_local(location):
        os.makedirs(parent, exist_ok=True)
        temporary = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    else:
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    return str(location)


def write_text(location: str | Path, text: str) -> str:
    """``write_bytes`` of UTF-8 text."""
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: str | Path, value: Any) -> str:
    """``value`` as indented JSON, atomically."""
    return write_text(location, json.dumps(value, indent=2) + "\n")


def read_json(location: str | Path) -> Any:
    """The JSON value in the file at ``location``."""
    return json.loads(read_text(location))


def write_parquet(location: str | Path, rows: list[dict[str, Any]] | Any, schema: Any | None = None) -> str:
    """Rows (a list of dicts, or a ``pyarrow.Table``) as one Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return write_bytes(location, buffer.getvalue())


def read_parquet(location: str | Path) -> Any:
    """One Parquet file as a ``pyarrow.Table``."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(read_bytes(location)))


def read_parquet_rows(locations: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of Parquet files, in the given order."""
    return [row for location in locations for row in read_parquet(location).to_pylist()]


def remove(location: str | Path) -> None:
    """Delete a file or a directory tree at ``location`` (missing is fine)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, location: str | Path) -> str:
    """Copy the local directory ``local_dir`` to ``location``, replacing what was there.

    Locally the copy is staged next to the target and renamed, so ``location`` exists only whole.
    """
    import pyarrow.fs as pafs

    if is_local(location):
        _, target = filesystem(location)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
        try:
            shutil.copytree(local_dir, staging, dirs_exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)
        return str(location)
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    pafs.copy_files(str(Path(local_dir).absolute()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return str(location)


def local_copy(location: str | Path, cache_root: str | Path | None = None) -> str:
    """A local directory holding what ``location`` holds: the path itself when it is local,
    else a copy downloaded once into the cache (keyed by the location; refreshed when a
    ``.complete`` marker is missing)."""
    import pyarrow.fs as pafs

    if is_local(location):
        return filesystem(location)[1]
    from actors.settings import cache_dir

    root = Path(cache_root) if cache_root else cache_dir() / "storage"
    target = root / hashlib.sha256(str(location).encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return str(target)
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"{location}: no such directory")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        pafs.copy_files(path, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        (staging / ".complete").write_text(str(location))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
