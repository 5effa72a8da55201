"""Atomic writes: every result file goes through here (temporary in a private folder beside it, fsync, rename).

Result files get a normal file's mode (0666 less the umask, 0644 usually). A killed write leaves its
temporary folder (`.saecli-tmp-<host>-<pid>-*`); the next write into that folder removes it once that
process is gone. A full disk is a `DiskFullError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from saecli.errors import RunError, UsageError

# temporaries live in a private folder named after the writing host and process, so that a later run can
# tell an abandoned one (its process is gone) from one being written right now
_TMP_PREFIX = ".saecli-tmp-"
_HOST = socket.gethostname().replace("-", "_")
_cleaned: set[Path] = set()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: result files are as readable as any other file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path` (mode as a normal file),
    else removed. The first write into a folder removes temporaries that killed runs left there.
    A full disk becomes a `DiskFullError` naming the file and, with `size_hint` (bytes), the space it needs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-", dir=path.parent))
    tmp_path = tmp_dir / path.name  # writers that make their own temporary (safetensors) make it in tmp_dir
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)  # mkstemp-style writers leave 0600
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if is_disk_full(exc, path.parent, size_hint):
            raise DiskFullError(path, size_hint) from exc
        raise
    shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of writes into `folder` whose process is gone (once per folder and process)."""
    folder = Path(folder)
    if folder in _cleaned:
        return []
    _cleaned.add(folder)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(_TMP_PREFIX) and _abandoned(entry.name[len(_TMP_PREFIX) :]):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


def _abandoned(tag: str) -> bool:
    host, _, rest = tag.partition("-")
    pid = rest.partition("-")[0]
    if host != _HOST or not pid.isdigit():
        return False  # another machine's write (shared disk): not ours to judge
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class DiskFullError(RunError):
    """The disk filled up while writing a result; the message says which file and how much it needed."""

    def __init__(self, path: Path, needed: int | None = None):
        free = free_bytes(path.parent)
        need = f", which needs about {human_bytes(needed)}" if needed else ""
        super().__init__(
            f"the disk is full: writing {path}{need} failed with {human_bytes(free)} free. "
            "Free some space (or point the output at another disk) and run again"
        )
        self.path, self.needed = path, needed


def is_disk_full(exc: BaseException, folder: Path, size_hint: int | None = None) -> bool:
    """ENOSPC/EDQUOT, or a library's write failure (torch: 'file write failed') with the disk (nearly) full."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(exc)
    if "No space left" in text:
        return True
    if isinstance(exc, (RuntimeError, OSError)) and ("write failed" in text or "failed writing" in text):
        return free_bytes(folder) < max(size_hint or 0, 1 << 20)
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space on the disk holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse (UsageError) before any work when the disk holding `folder` cannot take `needed` bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise UsageError(
            f"{what} needs about {human_bytes(needed)} in {folder}, but that disk has "
            f"{human_bytes(free)} free: free some space, or choose a smaller size or another folder"
        )


def require_writable(folder: str | os.PathLike, what: str = "the output folder") -> None:
    """Refuse (UsageError) before any work when `folder` (or the parent it will be made in) cannot be written."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{what} {folder} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what} {folder} is not writable ({probe} is read-only for this user): "
            "fix its permissions or choose another folder"
        )


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], size_hint: int | None = None) -> None:
    """Atomic write through a function that writes to the path it is given (torch.save, save_file...)."""
    with atomic_path(path, size_hint=size_hint) as tmp:
        writer(tmp)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
