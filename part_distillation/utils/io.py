"""Atomic file output and canonical JSON, shared by every writer of results (the pseudo-label store, the
prototypes file, benchmarks, tools).

A file written through :func:`atomic_file` goes to a temporary file beside its destination, is fsynced and
then renamed into place: readers see the old file or the complete new one, never a half-written one, and a
failure (KeyboardInterrupt included) leaves the destination as it was.
"""

import contextlib
import functools
import hashlib
import io
import json
import os
import tempfile

__all__ = [
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "canonical_json",
    "read_json",
    "read_user_json",
    "remove_quietly",
    "sha256_file",
    "HashingFile",
]


def canonical_json(value) -> str:
    """Canonical JSON: sorted keys, no spaces, no NaN; identical input gives identical text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def read_user_json(path: str, what: str):
    """A JSON file a user named (``what``: the config key or flag that named it); a missing file or invalid JSON
    is a :class:`~part_distillation.utils.errors.ConfigError` naming ``what`` and the file."""
    from .errors import ConfigError

    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}={path!r} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}={path!r} is a folder; give the JSON file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}={path!r} is not valid UTF-8 JSON ({type(e).__name__}: {e}).") from None
    except OSError as e:
        raise ConfigError(f"{what}={path!r} cannot be read ({e.strerror or e}).") from None


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _file_mode() -> int:
    """rw for everyone the umask allows (mkstemp's 0600 would hide a shared store from other users)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(final_path: str):
    """An open temporary file beside ``final_path``, named ``.<name>.<random>.tmp``."""
    directory, name = os.path.split(final_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        os.fchmod(fd, _file_mode())
    except (AttributeError, OSError):  # platforms without fchmod
        pass
    return os.fdopen(fd, "wb"), tmp


@contextlib.contextmanager
def atomic_file(path: str, durable: bool = True):
    """Yield a binary file that replaces ``path`` when the block completes (fsynced, then renamed
    into place, so readers see the old file or the complete new one, never a partial one); on any
    error, including KeyboardInterrupt, the temporary file is removed and ``path`` is left as it was.
    ``durable=False`` skips the fsyncs (still never a partial file; after a power loss the file may be
    missing): for data that is regenerated when missing, where an fsync per small file dominates."""
    f, tmp = _temp_file(path)
    try:
        with f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(os.path.dirname(path))
    except BaseException:
        remove_quietly(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, durable=durable) as f:
        f.write(data)


def atomic_write_json(path: str, value, compact: bool = False) -> None:
    """Sorted keys; ``compact`` on one line, else one top-level key per line with each list item
    (a manifest's shard entries) compact on its own line: readable, and small at 14k shards."""
    if compact:
        text = canonical_json(value)
    else:
        lines = []
        for key in sorted(value):
            item = value[key]
            if isinstance(item, list) and item and isinstance(item[0], dict):
                body = ",\n".join("  " + canonical_json(v) for v in item)
                lines.append(f" {json.dumps(key)}: [\n{body}\n ]")
            else:
                lines.append(f" {json.dumps(key)}: {canonical_json(item)}")
        text = "{\n" + ",\n".join(lines) + "\n}"
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


class HashingFile(io.RawIOBase):
    """Write-through file wrapper that hashes (``sha256``) and counts (``bytes``) the bytes written."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self):
        return True

    def write(self, data):
        self._f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)
