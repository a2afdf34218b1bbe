"""Process statistics every record reports (CPU time, peak resident memory, library versions) and the one heap
trimming call the engine, the streamer, the packed loader and recovery share."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import resource
import sys
from datetime import datetime, timezone

from lmshrink.core.version import __version__


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads): less sensitive to other jobs than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes: the larger of ``getrusage`` (Linux reports KiB) and
    the kernel's high-water mark ``VmHWM``, which ``getrusage`` may trail by a few pages."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return max(peak, high_water_mark() or 0)


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process to its current RSS (Linux); False where it
    cannot. ``getrusage``'s peak is not reset: ``peak_rss_bytes`` stays the whole process's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def high_water_mark() -> int | None:
    """The kernel's peak RSS of this process (``VmHWM``, since the start or the last reset), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap(collect: bool = False) -> None:
    """Hand the heap pages freed so far back to the operating system (glibc keeps them mapped by default, so a
    process that frees hundreds of MB in pieces would start its next pass from an inflated resident size).

    ``collect``: run the garbage collector first (for callers that just dropped reference cycles). Values in
    memory are unchanged; where there is no ``malloc_trim`` this does nothing.
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def environment() -> dict:
    """The versions and machine facts a result record states beside its numbers."""
    import torch
    import transformers


    return {
        "lmshrink": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
