"""Run-folder I/O: atomic writes (modes, failures, full disks), stale temporaries, the folder lock, JSON lines."""
from __future__ import annotations

import errno
import io as stdio
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from experiments import io

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


# ------------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mask):
    umask(mask)
    assert io.current_umask() == mask
    path = io.write_text(tmp_path / "a.json", "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = io.write_text(tmp_path / "summary.json", "old")

    def broken(fh):
        fh.write("new, half")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        io.atomic_write(path, broken, mode="w")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_full_disk_is_one_line_that_says_what_to_do(tmp_path):
    path = io.write_text(tmp_path / "resume.pt", "previous checkpoint")

    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(io.WriteFailedError) as info:
        io.atomic_write(path, full)
    message = str(info.value)
    assert "no space left" in message and "previous resume.pt is intact" in message and "free some space" in message
    assert "\n" not in message and isinstance(info.value, OSError)
    assert path.read_text() == "previous checkpoint" and len(list(tmp_path.iterdir())) == 1


def test_full_disk_inside_torch_save_is_recognised(tmp_path, monkeypatch):
    """torch.save wraps the file's ENOSPC in a RuntimeError ("unexpected pos"): still a full disk."""
    from experiments.training.checkpointing import atomic_torch_save

    real_fdopen = os.fdopen

    class Full(stdio.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.fh.fileno()

        def close(self):
            self.fh.close()
            super().close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(io.WriteFailedError, match="no space left"):
        atomic_torch_save({"w": torch.zeros(1000)}, tmp_path / "resume.pt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ stale temporaries


def test_remove_stale_temps_touches_only_ours(tmp_path, caplog):
    ours = [".resume.pt.k3j_9x2a.tmp", ".model_best.safetensors.abcdefgh.tmp", "summary.json.tmp",
            "autoattack-aa.adv.safetensors.tmp"]
    others = ["notes.tmp", ".resume.pt.tmp", "data.tmp.json", "resume.pt", ".hidden.ABCDEFGH.tmp"]
    for name in ours + others:
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".resume.pt.k3j_9x2a.tmp").write_text("x")
    assert sorted(io.remove_stale_temps(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["sub"])
    assert (tmp_path / "sub" / ".resume.pt.k3j_9x2a.tmp").exists(), "sub-folders belong to their own writers"
    assert "removed 4 temporary file(s)" in caplog.text


def test_a_killed_writers_temp_file_matches_the_pattern(tmp_path):
    """The pattern must match what atomic_write really creates (here: frozen mid-write)."""
    seen = []

    def spy(fh):
        seen.extend(p.name for p in tmp_path.iterdir())
        fh.write(b"x")

    io.atomic_write(tmp_path / "model_best.safetensors", spy)
    assert len(seen) == 1 and io.TEMP_PATTERN.match(seen[0]), seen


# ------------------------------------------------------------------------------------------ the lock

HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    folder, mode = sys.argv[2], sys.argv[3]
    if mode == "lock":
        from experiments.io import RunFolderLock
        lock = RunFolderLock(folder, "test holder")
        lock.acquire()
    else:  # flock the file but record a process that is gone (as a forked child of a dead run would)
        fd = os.open(os.path.join(folder, ".archlip.lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": int(sys.argv[4]), "host": sys.argv[5]}).encode())
    print("locked", flush=True)
    sys.stdin.read()
    if mode == "lock":
        lock.release()
""")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _hold(tmp_path: Path, folder: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(ROOT), str(folder), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    proc = _hold(tmp_path, folder, "lock")
    try:
        with pytest.raises(io.RunFolderLockedError) as info:
            io.RunFolderLock(folder, "archlip train").acquire()
        message = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "test holder" in message
        assert "in use" in message and "\n" not in message
    finally:
        proc.communicate("")
    assert proc.returncode == 0
    assert not (folder / io.LOCK_NAME).exists(), "a clean exit removes the lock file"
    with io.RunFolderLock(folder):  # free again
        pass


def test_lock_is_reentrant_in_one_process_and_removed_at_the_end(tmp_path):
    folder = tmp_path / "run"
    with io.RunFolderLock(folder, "outer"):
        with io.locked_folder(folder, "inner"):
            assert (folder / io.LOCK_NAME).exists()
        holder = json.loads((folder / io.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and "outer" in holder["command"]
    assert not (folder / io.LOCK_NAME).exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = _dead_pid()
    (folder / io.LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train"}))
    (folder / ".resume.pt.abcdefgh.tmp").write_text("half a checkpoint")
    with io.RunFolderLock(folder):
        pass
    assert f"pid {dead}" in caplog.text and "ended without releasing" in caplog.text
    assert "removed 1 temporary file(s)" in caplog.text and not (folder / ".resume.pt.abcdefgh.tmp").exists()


def test_lock_held_for_a_dead_process_on_this_host_is_broken(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = _dead_pid()
    proc = _hold(tmp_path, folder, "orphan", str(dead), socket.gethostname())
    try:
        with io.RunFolderLock(folder):
            assert json.loads((folder / io.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert "no longer running" in caplog.text
    finally:
        proc.communicate("")


def test_lock_held_from_another_host_says_how_to_clear_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = _hold(tmp_path, folder, "orphan", "12345", "node-17")
    try:
        with pytest.raises(io.RunFolderLockedError, match=r"pid 12345 on host node-17.*delete .*\.archlip\.lock"):
            io.RunFolderLock(folder).acquire()
    finally:
        proc.communicate("")


def test_locks_folder_decorator_locks_the_named_argument(tmp_path):
    seen = {}

    @io.locks_folder("out_dir", "unit")
    def work(x, *, out_dir=None):
        seen["locked"] = out_dir is not None and (Path(out_dir) / io.LOCK_NAME).exists()
        return x

    assert work(3, out_dir=tmp_path / "o") == 3 and seen["locked"]
    assert work(4) == 4 and not seen["locked"]


# ------------------------------------------------------------------------------------------ JSON lines


def test_read_jsonl_drops_a_torn_last_line_with_a_note(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "train_loss": 0.1')
    assert io.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    assert "torn last line" in caplog.text
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        io.read_jsonl(path)
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []
