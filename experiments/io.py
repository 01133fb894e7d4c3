"""Run-folder I/O: the one home for how archlip writes and reads the files of a run folder.

- :func:`atomic_write` (and :func:`write_text`, :func:`write_json`): a temporary file in the target's folder,
  flushed and fsync'ed, then ``os.replace``d over the target and the folder fsync'ed, so a crash at any moment
  leaves either the old or the new file. The final file gets the mode a plain ``open()`` would give it
  (``0o666`` minus the umask), so colleagues can read shared results. A write that fails (a full disk) removes
  its temporary file and raises :class:`WriteFailedError`, one line that says what to do; the previous file
  stays intact.
- :func:`remove_stale_temps`: the temporary files of writers killed mid-write (SIGKILL, power loss) are
  removed when a run folder is locked again: only ours, recognised by name, only in that folder.
- :class:`RunFolderLock`: one writer per run folder. An exclusive ``fcntl.flock`` on ``.archlip.lock`` in the
  folder, which records the holder (pid, host, command, start time). A second writer gets
  :class:`RunFolderLockedError` naming the holder; the lock of a process that died is taken over with a note.
  Reentrant within a process, so a command may lock a folder that a library call it makes locks again.
- :func:`read_jsonl`: JSON lines, tolerating a torn last line (a crash during an append): it is dropped with
  a note. A broken line anywhere else is an error.
- :func:`run_file`: the files of a run folder are named by what they hold (``RUN_FILES``: ``train_summary.json``,
  ``eval_summary.json``, ``record.json``); folders written before carry the old name ``summary.json``, still read.

Notes (a stale lock taken over, temporary files removed, a torn line dropped) go to the ``archlip`` logger at
WARNING level: printed on stderr by default, captured by ``caplog`` in tests.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

LOG = logging.getLogger("archlip")

LOCK_NAME = ".archlip.lock"

#: Temporary files of :func:`atomic_write`: ``.NAME.XXXXXXXX.tmp`` (``tempfile.mkstemp`` with prefix ``.NAME.``)
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
#: Temporary files of the writers archlip used before this module (``summary.json.tmp``, ``x.adv.safetensors.tmp``)
LEGACY_TEMP_PATTERN = re.compile(r"^(?P<target>[^.].*\.(?:json|jsonl|safetensors))\.tmp$")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

#: What a run folder's file holds -> (its name, the name folders written before still carry).
RUN_FILES: dict[str, tuple[str, str]] = {
    "train_summary": ("train_summary.json", "summary.json"),  # a training run folder (archlip train --out)
    "eval_summary": ("eval_summary.json", "summary.json"),  # an evaluation folder (archlip eval --out)
    "record": ("record.json", "summary.json"),  # a sweep run's measured model record (runs/<id>/)
}


def run_file(folder: str | os.PathLike, kind: str) -> Path:
    """The path of ``folder``'s ``kind`` file (a key of ``RUN_FILES``): its current name when that file exists or
    the old one does not (where it is written), else the old name (a folder written before the rename)."""
    if kind not in RUN_FILES:
        raise ValueError(f"unknown run file {kind!r}; valid: {', '.join(RUN_FILES)}")
    name, old = RUN_FILES[kind]
    path = Path(folder) / name
    return path if path.is_file() or not (Path(folder) / old).is_file() else Path(folder) / old


class WriteFailedError(OSError):
    """Writing a run-folder file failed (e.g. the disk is full); the previous version of the file is intact."""

    def __init__(self, what: str, advice: str = "free some space and run the command again",
                 code: int = errno.ENOSPC) -> None:
        super().__init__(f"{what}: {advice}")  # str() is the message alone, without an "[Errno N]" prefix
        self.errno = code
        self.what = what  # what failed and what is left, without the advice (callers may give their own)


class RunFolderLockedError(OSError):
    """Another process holds the run folder's lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.EBUSY


# ----------------------------------------------------------------------------------------------------------
# atomic writes


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (some file systems refuse fsync on folders: then there is nothing to do)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, or (torch.save wraps it in a RuntimeError) no room left."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 64 * 2**20
    return False


def _free_text(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover
        return "unknown space"
    return f"{free / 2**20:.0f} MiB free" if free >= 2**20 else f"{free} bytes free"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary sibling that is fsync'ed and renamed.

    ``mode`` is "wb" (bytes) or "w" (UTF-8 text). The file gets mode ``0o666 & ~umask``. On failure the
    temporary file is removed and the previous ``path`` (if any) is left as it was; a full disk raises
    :class:`WriteFailedError` with how much space is left.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # file systems without modes (vfat, some network mounts) keep theirs
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)) and _is_disk_full(exc, path.parent):
            kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
            raise WriteFailedError(f"could not write {path}: no space left on the device ({_free_text(path.parent)}); "
                                   f"{kept}") from None
        raise
    _fsync_folder(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a text (UTF-8)."""
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def to_jsonable(obj: Any) -> Any:
    """``obj`` with only JSON types: the one conversion rule of archlip's result files and ``--json`` output.

    Tensors, numpy values, enums (their value, e.g. a Guarantee label), dataclasses (``to_dict()`` when they have
    one), paths and containers are converted recursively; unknown objects become ``str(obj)``. Non-finite
    floats: NaN becomes ``null`` (no value), +-inf the strings ``"inf"``/``"-inf"`` (a value that is unbounded).
    """
    import dataclasses
    import enum
    import math

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else (None if math.isnan(obj) else str(obj))
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write` of ``json.dumps(to_jsonable(payload))`` with a final newline."""
    return write_text(path, json.dumps(to_jsonable(payload), indent=indent) + "\n")


def check_writable_folder(folder: str | os.PathLike, label: str = "output folder") -> None:
    """Check, before any work, that ``folder`` is (or can be created as) a folder this process can write to:
    ``NotADirectoryError`` if it or an ancestor is a file, ``PermissionError`` if it cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{label} {folder} is a file; give a directory")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{label} {folder} cannot be created: {probe} is a file; give another directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PermissionError(f"{label} {folder} is not writable ({exc.strerror or exc} in {probe}); give a folder "
                              f"you can write to") from None


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files that interrupted atomic writes left in ``folder`` (not in sub-folders).

    Only files named like :func:`atomic_write`'s temporaries (``.NAME.XXXXXXXX.tmp``) or the older writers'
    (``NAME.json.tmp``, ``NAME.safetensors.tmp``) are touched. Call it only while holding the folder's lock
    (:class:`RunFolderLock` does), so no live writer's file is removed. Returns the removed names.
    """
    folder = Path(folder)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if (TEMP_PATTERN.match(entry.name) or LEGACY_TEMP_PATTERN.match(entry.name)) and entry.is_file() \
                and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry.name)
    if removed:
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        LOG.warning("note: removed %d temporary file(s) that an interrupted run left in %s: %s", len(removed),
                    folder, shown)
    return removed


# ----------------------------------------------------------------------------------------------------------
# the run-folder lock


@dataclass
class _Held:
    fd: int
    depth: int
    pid: int


_HELD: dict[str, _Held] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h (archlip train ...), since 2024-05-01 12:00:00``; "an unknown process" if unreadable."""
    if not holder.get("pid"):
        return "another process (it has not recorded itself yet)"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _command_line(purpose: str) -> str:
    argv = shlex.join(sys.argv) if sys.argv and sys.argv[0] else "python"
    text = f"{purpose}: {argv}" if purpose else argv
    return text if len(text) <= 300 else text[:297] + "..."


class RunFolderLock:
    """Exclusive lock of a run folder for one writer (a context manager; reentrant within a process).

    ``RunFolderLock(folder, "archlip train")``: on entry the folder is created, ``.archlip.lock`` in it is
    ``flock``ed (the holder's pid, host, command and start time written into it) and the temporary files of
    interrupted writes are removed; on exit the lock file is removed. A folder locked by a live process raises
    :class:`RunFolderLockedError` naming it; the lock of a process that died (its lock file left behind) is
    taken over with a note. File systems must support ``flock`` across hosts for cluster use (local disks,
    NFSv4, Lustre mounted with ``-o flock``, GPFS do).
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self._key = ""

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.folder)
        held = _HELD.get(self._key)
        if held is not None and held.pid == os.getpid():
            held.depth += 1
            return
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _dead_here(holder):  # a child it forked still holds the file open: break the lock
                    LOG.warning("note: %s holds the lock of %s but is no longer running; taking the folder over",
                                describe_holder(holder), self.folder)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                raise RunFolderLockedError(self._busy_message(holder)) from None
            if not self._still_ours(fd):  # removed or replaced between open and flock: try again
                os.close(fd)
                continue
            self._take(fd)
            return
        raise RunFolderLockedError(f"could not lock {self.folder}: its lock file kept changing; is another process "
                                   f"starting in it right now?")

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int) -> None:
        previous = _read_holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            LOG.warning("note: the previous writer of %s (%s) ended without releasing it; taking the folder over",
                        self.folder, describe_holder(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(self.purpose),
                  "since": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        _HELD[self._key] = _Held(fd, 1, os.getpid())
        remove_stale_temps(self.folder)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        text = f"run folder {self.folder} is in use by {describe_holder(holder)}; wait for it to finish or write to " \
               f"another folder"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            text += f" (if that process is gone, e.g. its machine crashed, delete {self.path})"
        return text

    def release(self) -> None:
        held = _HELD.get(self._key)
        if held is None or held.pid != os.getpid():
            return
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[self._key]
        if self._still_ours(held.fd):  # remove the file while still holding it, then let go
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(held.fd)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike | None, purpose: str = "") -> Iterator[Path | None]:
    """``with locked_folder(out, "archlip eval"):`` holds :class:`RunFolderLock` (no-op for ``None``)."""
    if folder is None:
        yield None
        return
    with RunFolderLock(folder, purpose) as lock:
        yield lock.folder


F = TypeVar("F", bound=Callable[..., Any])


def locks_folder(argument: str, purpose: str) -> Callable[[F], F]:
    """Decorator: hold the lock of the folder passed as ``argument`` (when not None) during the call."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = signature.bind(*args, **kwargs).arguments.get(argument)
            with locked_folder(folder, purpose):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] if it does not exist).

    A torn last line (a crash or a full disk during an append: no final newline, not valid JSON) is dropped
    with a note; a line that is not valid JSON anywhere else raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                LOG.warning("note: dropped the torn last line of %s (an interrupted write): %r", path,
                            line if len(line) <= 60 else line[:57] + "...")
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({exc.msg}); the file is damaged: "
                             f"delete that line or the file") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; the file is damaged")
        rows.append(row)
    return rows


__all__ = ["atomic_write", "write_text", "write_json", "to_jsonable", "check_writable_folder", "remove_stale_temps", "RunFolderLock", "locked_folder",
           "locks_folder", "read_jsonl", "WriteFailedError", "RunFolderLockedError", "current_umask", "LOCK_NAME"]
