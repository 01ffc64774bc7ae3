"""Stored formats' shared layer: atomic writes, manifests with checksums, verification and the
cache of conversions. A conversion is written under a temporary sibling and renamed when complete,
manifest last, so an interrupted or failed writer leaves nothing that looks complete."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .contract import LoaderError, scan_imagefolder

VERIFY_MAX_BYTES = 4 << 30  # checksums of more would cost every run minutes; size checks remain


def temp_sibling(out: Path) -> Path:
    """The hidden sibling ``out`` is written under, named by this process. Leftovers of writers that
    are gone (killed mid-write) are removed first, so a re-run does not accumulate partial copies."""
    out = Path(out)
    if out.parent.is_dir():
        for old in out.parent.glob(f".{out.name}.tmp-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                remove(old)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


@contextmanager
def temp_output(out: Path):
    """Yield the temporary sibling to write ``out`` under; the caller renames it into place when
    complete. On any failure it is removed, and an OSError (a full disk) becomes one line naming ``out``."""
    tmp = temp_sibling(out)
    remove(tmp)  # a dead writer's, if this process's pid was once its pid
    try:
        yield tmp
    except BaseException as exc:
        remove(tmp)
        if isinstance(exc, OSError):
            raise write_failed(exc, Path(out)) from exc
        raise


def write_atomic(path: Path | str, text: str) -> Path:
    """Write ``path`` whole or not at all: a reader never sees half a file."""
    path = Path(path)
    with temp_output(path) as tmp:
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def write_json(path: Path | str, doc) -> Path:
    return write_atomic(path, json.dumps(doc, indent=1, default=str))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_failed(exc: OSError, out: Path) -> LoaderError:
    """A failed write as one line; the partial output has already been removed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LoaderError(
            f"out of space writing {out} ({exc.filename or out.parent}); the partial output was "
            "removed: free some space or write elsewhere"
        )
    return LoaderError(f"cannot write {out}: {exc.strerror or exc}; the partial output was removed")


def file_sha1(path: Path) -> str:
    """The checksum conversions record: damage a size check cannot see (flipped bytes inside an
    image record decode to garbage without an error) is refused when the data is read."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, **extra) -> dict:
    """A manifest's record of one written file: name, size and checksum."""
    return {"file": path.name, **extra, "bytes": path.stat().st_size, "sha1": file_sha1(path)}


def verify_files(folder: Path, entries: list[dict], what: str, verify: bool = True) -> None:
    """Every file a manifest lists is there, of its recorded size and, when they total at most
    VERIFY_MAX_BYTES, of its recorded checksum; else a LoaderError naming the file."""
    for e in entries:
        path = folder / e["file"]
        if not path.is_file():
            raise LoaderError(f"{what} {path} is missing (listed in its manifest)")
        size = path.stat().st_size
        if size != e["bytes"]:
            raise LoaderError(
                f"{what} {path} is {'truncated' if size < e['bytes'] else 'damaged'}: {size} bytes, "
                f"its manifest says {e['bytes']}; convert again"
            )
    if verify and sum(e["bytes"] for e in entries) <= VERIFY_MAX_BYTES:
        for e in entries:
            if "sha1" in e and file_sha1(folder / e["file"]) != e["sha1"]:
                raise LoaderError(
                    f"{what} {folder / e['file']} is damaged: its content differs from the checksum "
                    "recorded when it was converted; convert again"
                )


def require_manifest(data: Path, manifest: Path, what: str, backend: str) -> None:
    """``data`` (a file or folder) and its manifest exist, or a LoaderError saying how to get them."""
    if not data.exists():
        raise LoaderError(f"{what} not found: {data}")
    if not manifest.is_file():
        raise LoaderError(
            f"{data} has no manifest {manifest.name}: an interrupted or foreign conversion; "
            f"convert again with `bench data convert --to {backend}`"
        )


def read_manifest(path: Path, kind: str) -> dict:
    """A manifest of ours (``kind``), or a LoaderError."""
    try:
        manifest = json.loads(path.read_text())
        assert manifest["kind"] == kind
    except (ValueError, KeyError, AssertionError, TypeError):
        raise LoaderError(f"{path} is damaged or not ours; convert again") from None
    return manifest


def cache_dir(kind: str, split: Path, settings: dict) -> Path:
    """Where a conversion of an ImageFolder split under these settings is kept: keyed by the split's
    path and every file's name, size and mtime, so a changed, added or removed file (or other
    settings) gives a new conversion."""
    index = scan_imagefolder(split)
    h = hashlib.sha1(json.dumps([str(Path(split).resolve()), settings]).encode())
    for p in index.paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    root = Path(os.environ.get("LOADERBENCH_CACHE", Path.home() / ".cache" / "loaderbench"))
    return root / f"{kind}-{h.hexdigest()[:12]}"


def cached(out: Path, check: Callable[[Path], object], convert: Callable[[Path], object]) -> Path:
    """``out`` if ``check`` accepts it, else converted (again): a damaged conversion heals. When
    several ranks convert at once, a loser whose write failed uses the winner's copy."""
    try:
        check(out)
        return out
    except LoaderError:
        remove(out)
    try:
        convert(out)
    except (LoaderError, OSError) as exc:
        try:
            check(out)
        except LoaderError:
            raise exc from None
    return out
