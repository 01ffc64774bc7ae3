"""The page cache, measured and emptied without root: which share of a set of files is resident
(mmap + mincore), evicting them (fsync + POSIX_FADV_DONTNEED), and the bytes a process tree has
read from storage (/proc/<pid>/io read_bytes). A cold-cache run uses all three."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = mmap.PAGESIZE


def files_under(path: Path | str) -> list[Path]:
    """Every regular file a loader may read at ``path``: the file itself, or all files below it."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all)."""
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return sum(b & 1 for b in vec), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(files: list[Path]) -> float:
    """The share of the files' pages in the page cache (0 = all cold, 1 = all warm)."""
    got = total = 0
    for f in files:
        r, n = resident_pages(f)
        got, total = got + r, total + n
    return got / total if total else 0.0


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache. Dirty pages cannot be dropped, so each file is
    flushed first; DONTNEED then needs no privileges for a file the process can open."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(pid: int | str = "self") -> int:
    """Bytes ``pid`` caused to be read from storage (not from the page cache), its finished threads
    and waited-for children included (the kernel adds theirs to it when they are reaped)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise OSError(f"/proc/{pid}/io has no read_bytes")


def tree_read_bytes() -> int:
    """This process's read_bytes plus those of its live children (workers not yet reaped)."""
    import psutil

    total = read_bytes()
    for child in psutil.Process().children(recursive=True):
        try:
            total += read_bytes(child.pid)
        except OSError:  # gone meanwhile: the kernel added its count to ours when it was reaped
            pass
    return total
