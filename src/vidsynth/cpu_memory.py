"""Freed memory is reused while the CPU denoises and decodes, rather than handed back to the kernel and refaulted.

PyTorch's CPU allocator takes every tensor from the C library's malloc. glibc serves large blocks with a fresh mmap
and unmaps them on free, so each step's activations arrive as new pages that the kernel must fault in and zero: a
guided ms-1.7b UNet forward at 8x128x128 makes 350-680k page faults and spends 1.2-2.3 s in the kernel, and writing a
fresh tensor runs at a fifth of the speed of writing a reused one. Within `freed_memory_reused()` glibc serves every
block from its heap and keeps freed ones for the next step; on leaving, the free memory goes back to the system and
glibc's usual settings return. The heap fragments: at the default video the denoising peaks ~0.7 GiB higher, at
64 frames 256x256 3-6 GiB, varying from run to run (BENCHMARKS.md, with what was tried against it: one arena,
trimming between the UNet's blocks), which is why the pipeline's low-memory mode (forward chunking) does without
it. Decoding uses it in the default mode, where its Winograd convolutions gain only with it (BENCHMARKS.md); there
its chunks are small and alike, and the video's peak stays the denoising's. A caching allocator library
(jemalloc, tcmalloc) would do the same but needs LD_PRELOAD; this needs only glibc's own `mallopt`, so elsewhere
(macOS, musl) the block changes nothing.

Memory freed in the heap after the block stays resident until trimmed: blocks under glibc's mmap threshold (which it
raises up to 32 MB as big tensors come and go) are carved from the heap's free memory. So the pipeline also hands
free memory back after each generation, `free_memory_handed_back()`, and an idle server or notebook keeps only what
it uses (without it, 0.45 GiB stayed after one 8x256x256 video). The heap itself stays as large as the block made
it, and glibc serves later blocks from its free memory first: a low-memory pipeline run in the same process after a
reused-heap one peaks higher than in a fresh process (BENCHMARKS.md), so its budget holds for a process that uses
that mode from the start, as the CLI and the server do.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import re
import threading
from pathlib import Path
from typing import Optional

# mallopt parameters and glibc's defaults for them (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_holders = 0  # denoising loops inside the block: the settings are process-wide, so the last one out restores them


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


@contextlib.contextmanager
def freed_memory_reused():
    global _holders
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _holders == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


@contextlib.contextmanager
def free_memory_handed_back():
    """On leaving, the heap's free memory goes back to the system, unless a block above still reuses it."""
    try:
        yield
    finally:
        libc = _glibc()
        with _lock:
            if libc is not None and _holders == 0:
                libc.malloc_trim(0)


def available_memory_bytes() -> Optional[int]:
    """What this process can still fill without swapping or meeting a memory limit (Linux): the kernel's MemAvailable,
    less the file pages this process keeps resident (MemAvailable counts them as reclaimable, but evicting mapped
    weights would only make them fault back in), and no more than its cgroups' limits leave. None where unknown."""
    try:
        available = _kib_field(Path("/proc/meminfo").read_text(), "MemAvailable")
        available -= _kib_field(Path("/proc/self/status").read_text(), "RssFile")
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except (OSError, AttributeError):
        return None
    for line in memberships:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # cgroup v2
            headroom = _cgroup_headroom(Path("/sys/fs/cgroup"), group, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            headroom = _cgroup_headroom(Path("/sys/fs/cgroup/memory"), group, "memory.limit_in_bytes",
                                        "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        if headroom is not None:
            available = min(available, headroom)
    return max(available, 0)


def _cgroup_headroom(root: Path, group: str, limit_file: str, usage_file: str, inactive_key: str) -> Optional[int]:
    """The least room under the limits of a cgroup and its ancestors (usage counts page cache; its inactive part is
    reclaimed before the limit bites), or None if none is limited or readable."""
    own = root / group.lstrip("/")
    rooms = []
    for folder in [own, *own.parents[:len(own.relative_to(root).parts)]]:
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                stat = (folder / "memory.stat").read_text()
                inactive = re.search(rf"^{inactive_key} (\d+)$", stat, re.MULTILINE)
                used = int((folder / usage_file).read_text()) - (int(inactive.group(1)) if inactive else 0)
                rooms.append(int(limit) - used)
        except (OSError, ValueError):
            pass
    return min(rooms, default=None)


def _kib_field(text: str, name: str) -> int:
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
