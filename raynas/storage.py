"""The one storage layer: every artifact of a run is read and written here, through pyarrow.fs.

A location is a string: a local path (relative or absolute) or a URI that pyarrow.fs resolves
(`s3://`, `gs://`, `abfs://`, `hdfs://`, `file://`). A local path is just the special case of a
`LocalFileSystem`; no other module opens artifact files itself. S3-compatible servers (MinIO, Ceph,
moto) are reached through the standard `AWS_ENDPOINT_URL` and credential variables, which pyarrow reads
on each node, the same as Ray Train's own storage layer does.

Writes are atomic: a reader (another node, a resumed run) sees the whole old file or the whole new one,
never part of one. Object stores publish an object only when its upload completes, so they are written
directly; file systems with directories write a temporary sibling and rename it over the target.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raynas.errors import UserError

# Schemes whose objects become visible only when fully uploaded: a direct write is already atomic.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")
# Schemes whose pyarrow path is "<bucket>/<key>": their file system is cached per bucket.
BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(UserError):
    """A location that cannot be read or written; the message names it."""


class CorruptFile(StorageError):
    """A file that was read whole but is not what its reader expects: torn (cut short by a writer killed
    before writes were atomic) or foreign. A run that owns the file may set it aside and redo it."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (other than a Windows drive letter); False for a plain local path."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1


def is_local(location: str | os.PathLike) -> bool:
    """True when the location lives on this node's own disk (a path or a `file://` URI)."""
    return not is_uri(location) or urlsplit(str(location)).scheme == "file"


def normalize(location: str | os.PathLike) -> str:
    """A location other nodes and later runs can use: local paths made absolute, URIs kept as given."""
    location = str(location)
    if not location:
        raise StorageError("location: empty; allowed: a local path or a URI such as s3://bucket/prefix")
    if not is_uri(location):
        return os.path.abspath(os.path.expanduser(location))
    return location.rstrip("/") if len(location) > len(urlsplit(location).scheme) + 3 else location


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...`, for paths and URIs alike (query strings stay at the end of a URI)."""
    location = str(location)
    if not is_uri(location):
        return os.path.join(location, *parts)
    split = urlsplit(location)
    path = posixpath.join(split.path or "/", *parts)
    return split._replace(path=path).geturl()


def basename(location: str | os.PathLike) -> str:
    location = str(location)
    return posixpath.basename(urlsplit(location).path.rstrip("/")) if is_uri(location) else os.path.basename(
        location.rstrip(os.sep))


def parent(location: str | os.PathLike) -> str:
    location = str(location)
    if not is_uri(location):
        return os.path.dirname(os.path.abspath(location))
    split = urlsplit(location)
    return split._replace(path=posixpath.dirname(split.path.rstrip("/")) or "/").geturl()


def display(location: str | os.PathLike) -> str:
    """The location as a user gave it, without credentials or query options."""
    location = str(location)
    if not is_uri(location):
        return location
    split = urlsplit(location)
    return f"{split.scheme}://{split.hostname or ''}{split.path}"


@lru_cache(maxsize=32)
def _bucket_filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    # Building an S3 file system resolves the bucket's region (a network call): once per bucket.
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/" + (f"?{query}" if query else ""))
    return fs


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system holding `location` and the path within it."""
    location = normalize(location)
    try:
        if not is_uri(location):
            return pafs.LocalFileSystem(), location
        split = urlsplit(location)
        if split.scheme in BUCKET_SCHEMES:
            fs = _bucket_filesystem(split.scheme, split.netloc, split.query)
            return fs, f"{split.netloc}{split.path}".rstrip("/")
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise StorageError(f"location: cannot open {display(location)} ({_reason(exc)}); allowed: a local "
                           "path or a URI pyarrow.fs knows (s3://, gs://, abfs://, hdfs://, file://)") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def filesystem_for_ray(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """`(storage_path, storage_filesystem)` for Ray Train's `RunConfig`, so Ray and raynas share one store."""
    location = normalize(location)
    if not is_uri(location):
        return location, None
    fs, path = resolve(location)
    return path, fs


# ---- queries ---------------------------------------------------------------------------------------------
def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"location: cannot read {display(location)} ({_reason(exc)})") from None


def exists(location: str | os.PathLike) -> bool:
    return _info(str(location)).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    info = _info(str(location))
    return info.type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    return _info(str(location)).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int:
    info = _info(str(location))
    return info.size if info.type == pafs.FileType.File else 0


def list_dir(location: str | os.PathLike) -> list[str]:
    """Names of the entries directly under `location`, sorted; empty when it does not exist."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, pa.ArrowInvalid) as exc:  # e.g. a regular file where a directory was expected
        raise StorageError(f"location: cannot list {display(location)} ({_reason(exc)})") from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def list_files(location: str | os.PathLike, suffix: str = "") -> list[str]:
    """Locations of the files directly under `location` whose names end with `suffix`, sorted by name."""
    location = str(location)
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"location: cannot list {display(location)} ({_reason(exc)})") from None
    names = sorted(posixpath.basename(i.path) for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(location, n) for n in names]


# ---- reading -----------------------------------------------------------------------------------------------
def read_bytes(location: str | os.PathLike, what: str = "file") -> bytes:
    """The file's bytes; a missing or unreadable file is a `StorageError` naming `what` and the location."""
    location = str(location)
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise StorageError(f"{what}: {display(location)} does not exist") from None
    except (OSError, pa.ArrowInvalid) as exc:
        if not exists(location):
            raise StorageError(f"{what}: {display(location)} does not exist") from None
        raise StorageError(f"{what}: cannot read {display(location)} ({_reason(exc)})") from None


def read_text(location: str | os.PathLike, what: str = "file") -> str:
    data = read_bytes(location, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFile(f"{what}: {display(location)} is not UTF-8 text") from None


def read_json(location: str | os.PathLike, what: str = "file") -> Any:
    try:
        return json.loads(read_text(location, what))
    except ValueError:
        raise CorruptFile(f"{what}: {display(location)} is not valid JSON") from None


def read_table(location: str | os.PathLike, what: str = "table", columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a pyarrow Table; a corrupt or foreign file is one `StorageError` line."""
    data = read_bytes(location, what)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptFile(f"{what}: {display(location)} is not a readable Parquet file ({_reason(exc)})") from None


def read_pandas(location: str | os.PathLike, what: str = "table"):
    return read_table(location, what).to_pandas()


def load_torch(location: str | os.PathLike, what: str = "checkpoint", map_location: str = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a stored file: never runs code from it."""
    import torch

    return torch.load(io.BytesIO(read_bytes(location, what)), map_location=map_location, weights_only=True)


# ---- writing -----------------------------------------------------------------------------------------------
def write_bytes(location: str | os.PathLike, data: bytes | bytearray | memoryview) -> str:
    """Write `data` atomically (see the module doc); returns the location."""
    location = str(location)
    fs, path = resolve(location)
    object_store = is_uri(location) and urlsplit(location).scheme in OBJECT_STORE_SCHEMES
    try:
        parent_path = posixpath.dirname(path) if object_store else os.path.dirname(path)
        if parent_path:
            fs.create_dir(parent_path, recursive=True)
        if object_store:
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return location
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp) as stream:
                stream.write(data)
            fs.move(tmp, path)
        except BaseException:
            _quiet_delete(fs, tmp)
            raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"location: cannot write {display(location)} ({_reason(exc)})") from None
    return location


def _quiet_delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, pa.ArrowInvalid):
        pass


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: str | os.PathLike, value: Any) -> str:
    return write_text(location, json.dumps(value, indent=1, sort_keys=True))


def write_table(location: str | os.PathLike, table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return write_bytes(location, sink.getvalue())


def write_rows(location: str | os.PathLike, rows: list[dict[str, Any]]) -> str:
    """Records as one Parquet table with every field any of them has (missing values as nulls): pyarrow's
    `from_pylist` alone would keep only the first record's fields."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    return write_table(location, pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in rows]))


def write_pandas(location: str | os.PathLike, frame) -> str:
    return write_table(location, pa.Table.from_pandas(frame, preserve_index=False))


def save_torch(location: str | os.PathLike, obj: Any) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(location, buffer.getbuffer())


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a directory tree; nothing happens when it is absent."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def set_aside(location: str | os.PathLike) -> str:
    """Move a corrupt file out of the way (to `<name>.torn-<id>`, which no reader picks up by its suffix)
    so that the run redoes it; the bytes stay for inspection. Returns the new location."""
    location = str(location)
    fs, path = resolve(location)
    target = f"{location}.torn-{uuid.uuid4().hex[:8]}"
    try:
        fs.move(path, resolve(target)[1])
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"location: cannot move {display(location)} aside ({_reason(exc)})") from None
    return target


def check_writable(location: str | os.PathLike, what: str = "location") -> str:
    """Fail now, in one line naming `what`, when `location` cannot be written (before any work)."""
    location = normalize(location)
    probe = join(location, f".raynas-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
    except StorageError as exc:
        reason = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
        raise StorageError(f"{what}: {display(location)} is not writable ({reason})") from None
    fs, path = resolve(probe)
    _quiet_delete(fs, path)
    return location


# ---- directories between a node's disk and the store ------------------------------------------------------
def download_dir(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy the tree under `location` into a local directory (e.g. for a reader that needs file paths)."""
    fs, path = resolve(location)
    local_dir = Path(local_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        target = local_dir / posixpath.relpath(info.path, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as stream:
            target.write_bytes(stream.read())
    return local_dir


@contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local path to read `location` from: itself when local, else a temporary download."""
    import tempfile

    location = normalize(location)
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="raynas-") as tmp:
        target = Path(tmp) / (basename(location) or "data")
        if is_dir(location):
            download_dir(location, target)
        else:
            target.write_bytes(read_bytes(location))
        yield target
