"""Atomic files and folders: nothing vlkd writes is ever seen half-written under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlkd.errors import OutputExistsError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private to this user
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def check_output(final: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; before any work starts."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(f"output {final} already exists; pass --overwrite to replace it or choose --out")
    return final


@contextlib.contextmanager
def staged_folder(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` only when the block completes.

    A killed or failed run leaves at most a ``.name.partial-*`` folder, never one under the final name.
    """
    final = check_output(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make every exported folder private
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        # Move the old folder aside first so a crash between the two renames loses nothing.
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """SHA-256 over the files' paths relative to ``root`` and their contents, in sorted order: what caches key on."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
