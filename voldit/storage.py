"""Where files live: local paths or object-store URLs (``s3://bucket/key``), through fsspec.

S3 endpoint and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles); they are never logged,
never written into configs, checkpoints or manifests. Writes are atomic either way: a local file is
written under a temporary name and renamed; an S3 object appears whole when its upload completes.
A directory (a checkpoint) is uploaded with its ``meta.json`` last, so it counts as complete only
once every other file is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from voldit.errors import VolditError

log = logging.getLogger(__name__)

MARKER = "meta.json"  # the file that marks a directory (checkpoint) as complete; uploaded last


class StorageError(VolditError, RuntimeError):
    """Storage that cannot be used as given (endpoint, credentials, bucket); says what to fix."""


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def filesystem(path: str | os.PathLike):
    """(fsspec filesystem, path within it)."""
    fs, inner = fsspec.core.url_to_fs(str(path))
    return fs, inner


def _url(fs, inner: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return inner if protocol in ("file", "local") else f"{protocol}://{inner}"


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def glob(pattern: str) -> list[str]:
    """Matching paths (URLs for remote storage), sorted."""
    fs, inner = filesystem(pattern)
    return sorted(_url(fs, p) for p in fs.glob(inner))


def remove(path: str | os.PathLike) -> None:
    fs, inner = filesystem(path)
    fs.rm(inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def read_many(paths: list[str]) -> dict[str, bytes]:
    """The contents of many small files on one filesystem, by path; missing ones are left out. Remote
    files are fetched concurrently, one request each (s3fs would otherwise ask each one's size first)."""
    if not paths:
        return {}
    fs, _ = filesystem(paths[0])
    inner = {filesystem(p)[1]: p for p in paths}
    options = {"max_concurrency": 1} if "s3" in fs.protocol else {}
    found = fs.cat(list(inner), on_error="omit", **options)
    return {inner[k]: v for k, v in found.items() if not isinstance(v, Exception)}


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def put_file(local: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Move a finished local file to ``dest`` atomically (rename locally; one upload to S3)."""
    if is_remote(dest):
        upload(local, dest)
        Path(local).unlink(missing_ok=True)
    else:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, dest)
    return str(dest)


def write_bytes(dest: str | os.PathLike, data: bytes) -> str:
    """Write a whole file atomically."""
    local_dir = None if is_remote(dest) else Path(dest).parent
    if local_dir is not None:
        local_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(str(dest)).name}.", suffix=".tmp", dir=local_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return put_file(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(dest: str | os.PathLike, text: str) -> str:
    return write_bytes(dest, text.encode())


def upload(local: str | os.PathLike, dest: str) -> str:
    """Copy one finished local file to remote ``dest`` (the local file stays)."""
    fs, inner = filesystem(dest)
    fs.put_file(str(local), inner)
    return dest


def sync_dir(local: str | os.PathLike, dest: str) -> str:
    """Copy a local directory's files to remote ``dest`` (e.g. growing log files), replacing each."""
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        upload(path, join(dest, path.relative_to(local).as_posix()))
    return dest


def put_dir(local: str | os.PathLike, dest: str) -> str:
    """Upload a local directory (a checkpoint) to remote ``dest``: every file, then its MARKER last.
    A previous directory at ``dest`` loses its MARKER first, so it is never half old, half new."""
    if exists(join(dest, MARKER)):
        remove(join(dest, MARKER))
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == MARKER):
        upload(path, join(dest, path.relative_to(local).as_posix()))
    return dest


def copy_dir(src: str, dest: str) -> str:
    """Copy a remote directory (a complete checkpoint) to another remote place in the same store, with
    server-side copies (no data through this machine), its MARKER last; ``dest`` loses its MARKER first."""
    fs, inner_src = filesystem(src)
    _, inner_dest = filesystem(dest)
    if fs.exists(f"{inner_dest}/{MARKER}"):
        fs.rm(f"{inner_dest}/{MARKER}")
    files = sorted(fs.find(inner_src), key=lambda p: p.rsplit("/", 1)[-1] == MARKER)
    for path in files:
        fs.copy(path, inner_dest + path[len(inner_src) :])
    return dest


def get_dir(src: str, local: str | os.PathLike) -> Path:
    """Download a remote directory to a local one (replacing it). A key that would land outside ``local``
    (an empty, ``.`` or ``..`` part) is refused before anything is written."""
    fs, inner = filesystem(src)
    fs.invalidate_cache(inner)  # list what is there now, not what this process listed before
    local = Path(local)
    prefix = inner.rstrip("/") + "/"
    files = []
    for path in fs.find(inner):
        parts = path[len(prefix) :].split("/")
        if not path.startswith(prefix) or any(part in ("", ".", "..") for part in parts):
            raise StorageError(
                f"{src}: the object {_url(fs, path)} has a key with an empty, '.' or '..' part, which would "
                "be written outside the folder; nothing was downloaded. Remove or rename that object"
            )
        files.append((path, local.joinpath(*parts)))
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for path, target in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
    return local


def cache_root() -> Path:
    return Path(os.environ.get("VOLDIT_CACHE", Path.home() / ".cache" / "voldit"))


def staging_dir(kind: str, url: str) -> Path:
    """This node's local folder for ``url`` (a remote folder): where a job of ``kind`` ("runs",
    "synthesize", "remote", ...) writes or caches files before they are uploaded or after download."""
    return cache_root() / kind / hashlib.sha256(str(url).rstrip("/").encode()).hexdigest()[:16]


def localize_dir(path: str | os.PathLike, attempts: int = 3) -> Path:
    """A local copy of a directory: the path itself when local; for a URL, a cached download, made again
    when the remote MARKER changes.

    Safe with several processes (or threads) on one node: under a file lock, one of them downloads into a
    hidden folder beside the cache and renames it into place when complete, so a cached copy is never half
    written and the others use it once it is there. A copy of an older MARKER is deleted when a newer one
    is in place (a process still reading the old copy then loses it: it was out of date).
    """
    if not is_remote(path):
        return Path(path)
    url = str(path).rstrip("/")
    root = staging_dir("remote", url)
    try:
        remote_marker = _read_now(join(url, MARKER))
    except Exception:
        check(url, "folder")  # the first remote read: endpoint, credentials or bucket named in one line
        raise
    if remote_marker is None:
        return root / "missing"  # a path that does not exist: the caller reports it
    local = root / _version(remote_marker)
    if (local / MARKER).is_file():  # complete: copies appear only by rename
        return local
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        for _ in range(attempts):
            remote_marker = _read_now(join(url, MARKER))  # again: it may have changed while we waited
            if remote_marker is None:
                continue  # being uploaded again (its MARKER is removed first)
            local = root / _version(remote_marker)
            if (local / MARKER).is_file():
                break
            partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
            get_dir(url, partial)
            if (partial / MARKER).is_file() and (partial / MARKER).read_bytes() == remote_marker:
                os.rename(partial, local)
                break
            shutil.rmtree(partial)  # the directory changed during the download
        else:
            raise StorageError(
                f"{url} changed during {attempts} downloads in a row; try again once it is written"
            )
        # Older copies, and hidden folders of downloads that died (only the lock holder makes them).
        for other in root.iterdir():
            if other == local or other.name == ".lock":
                continue
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:
                other.unlink(missing_ok=True)  # a copy in the layout before versions
    return local


def _read_now(path: str) -> bytes | None:
    """A remote file's bytes as they are now (s3fs otherwise checks them against a listing it cached), or
    None when it does not exist."""
    fs, inner = filesystem(path)
    fs.invalidate_cache(inner)
    try:
        with fs.open(inner, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _version(marker: bytes) -> str:
    return hashlib.sha256(marker).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` between processes and threads; the system drops it if a holder dies."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check(url: str | os.PathLike, what: str = "storage") -> None:
    """Fail at once, with one clear message, when an S3 location cannot be used: endpoint unreachable,
    no or wrong credentials, or no such bucket. Local paths and other protocols pass."""
    if not str(url).startswith("s3://"):
        return
    bucket = str(url)[5:].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageError(
            f"{what} {url}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the URL"
        ) from None
    except PermissionError as error:
        raise StorageError(
            f"{what} {url}: access to bucket {bucket!r} at {endpoint} was refused ({_reason(error)}); "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and the bucket's policy"
        ) from None
    except Exception as error:  # botocore raises many kinds; name the cause, never the secrets
        name = type(error).__name__
        if "Credentials" in name or "credentials" in str(error).lower():
            raise StorageError(
                f"{what} {url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from None
        if "Endpoint" in name or "Connect" in name or isinstance(error, OSError):
            raise StorageError(
                f"{what} {url}: cannot reach the S3 endpoint {endpoint} ({name}); check AWS_ENDPOINT_URL"
            ) from None
        raise StorageError(f"{what} {url}: S3 refused the request ({name}: {_reason(error)})") from None


def _reason(error: Exception) -> str:
    text = str(error)
    return text if len(text) < 200 else text[:200] + "..."


def arrow_filesystem(fs):
    """An fsspec filesystem as pyarrow's, so Ray Data reads with the same endpoint and credentials."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
