"""Compiling lmshrink's C++ kernels with ``torch.utils.cpp_extension.load``, safe against builds that were killed.

torch marks a build in progress with a ``lock`` file in the build folder and waits, without any limit, for it to go
away; a build killed mid-way (Ctrl-C, a stopped job) leaves it behind and every later process then waits forever.
Here each build first holds an ``fcntl`` lock on a file of its own in the same folder, which the operating system
releases when its holder dies: while we hold it no other lmshrink process is building there, so a torch ``lock``
file still present is stale and is removed. Waiting for a live build is bounded (``wait_s``); past it the caller
gets an error and falls back to torch's kernels.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any

FLOCK_NAME = ".lmshrink-build.flock"
TORCH_BATON = "lock"  # the file torch.utils.cpp_extension's FileBaton creates and waits on


class BuildBusyError(RuntimeError):
    """Another live process has been building the same extension for longer than the wait allowed."""


def build_directory(name: str) -> Path:
    """The folder an extension is built in: ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
    then one folder per Python version and extension, as torch lays it out for CPU builds."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(root) / f"{python}_cpu" / name


def load_extension(name: str, sources: list[str], extra_cflags: list[str], *, wait_s: float = 900.0,
                   poll_s: float = 0.5, load: Any = None) -> Any:
    """Build (or load the cached build of) extension ``name``; never waits on a lock left by a killed build."""
    if load is None:
        from torch.utils.cpp_extension import load
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / FLOCK_NAME, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildBusyError(f"another process has been building {name} in {folder} for over "
                                         f"{wait_s:.0f} s") from None
                time.sleep(poll_s)
        try:
            # we hold the build lock, so no lmshrink build is in progress here: a torch baton is a killed build's
            (folder / TORCH_BATON).unlink(missing_ok=True)
            return load(name=name, sources=sources, extra_cflags=extra_cflags, build_directory=str(folder),
                        verbose=False)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

