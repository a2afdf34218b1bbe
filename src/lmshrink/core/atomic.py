"""Atomic writes: a folder or file appears complete at its final path, or not at all.

Everything is first written beside the target (same parent, so the final ``os.replace`` is a rename on one file
system) under a hidden temporary name, and removed again if anything fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from lmshrink.core.errors import LmshrinkError


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(target: str | os.PathLike, *, overwrite: bool = False,
                     protected: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output folder, after refusing the writes that could destroy data.

    Raises ``LmshrinkError`` when ``target`` is (or is inside, or contains) one of the ``protected`` folders (e.g. the
    input model's folder), when it is an existing file, or when it is a non-empty folder and ``overwrite`` is False.
    """
    path = Path(target).expanduser().resolve()
    for folder in protected:
        folder = Path(folder).expanduser().resolve()
        if is_within(path, folder) or is_within(folder, path):
            raise LmshrinkError(
                f"output folder {path} overlaps the input model's folder {folder}; the input is never modified",
                fix="choose an output folder outside the input model's folder (e.g. a sibling folder)")
    if path.exists() and not path.is_dir():
        raise LmshrinkError(f"output path {path} exists and is not a folder",
                            fix="choose another output path, or remove that file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LmshrinkError(f"output folder {path} exists and is not empty",
                            fix="choose a new output folder, or pass overwrite=True (CLI: --overwrite) to replace it")
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     protected: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on normal exit it replaces ``target`` in one rename.

    On an exception the temporary folder is deleted and ``target`` is left as it was. The checks of
    ``check_output_dir`` run first. An existing ``target`` (empty, or any with ``overwrite=True``) is moved aside
    and deleted only after the new folder is in place.
    """
    path = check_output_dir(target, overwrite=overwrite, protected=protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the final folder gets the usual umask permissions, not 0700
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        with_umask_permissions(staging)  # files some writers create private (safetensors: 0600)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:  # put the previous folder back before failing
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and straight back (briefly process-wide)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file in a folder tree) the permissions a plain ``open(path, "w")`` gives:
    ``0o666`` less the umask, keeping execute bits. Some writers create files private (mkstemp, safetensors' 0600),
    which other users of a shared cache or output folder then cannot read."""
    path = Path(path)
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, mode | (file.stat().st_mode & 0o111 & ~_umask()))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename, so readers never see a partial file.

    The file gets the permissions a plain ``open(path, "w")`` gives (``0o666`` less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``atomic_write_bytes`` for text."""
    return atomic_write_bytes(path, text.encode(encoding))
