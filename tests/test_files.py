"""Tests for `diffit_jax.files`: the folder lock's rules for live and dead holders, the
out-of-space classification, and damaged metadata. The commands' journeys through these
(two trainers, a full tmpfs, a damaged config.json) are in test_faults_checkpoints.py,
test_sample.py, test_data.py and test_convert_diffit.py."""

import errno
import json
import logging
import os
import subprocess
import sys
import time
import types

import pytest

from diffit_jax import cli, files, logging_utils
from helpers import subprocess_env


def write_holder(path, **fields):
  record = {"host": files.host_name(), "pid": os.getpid(), "command": "python -m x",
            "started": "2026-01-01T00:00:00", **fields}
  path.write_text(json.dumps(record))


def dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_the_lock_is_exclusive_and_released(tmp_path):
  path = tmp_path / "run" / files.LOCK_FILE
  lock = files.FolderLock(str(path), what="training run", advice="pass another --workdir")
  with lock:
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["what"] == "training run"
    # A second lock on the same file, in this process or another, is refused.
    with pytest.raises(files.FolderInUseError, match=f"pid {os.getpid()} on host"):
      files.FolderLock(str(path), what="training run", advice="pass another --workdir").acquire()
    other = subprocess.run(
        [sys.executable, "-c", "from diffit_jax import files; "
         f"files.FolderLock({str(path)!r}, what='x', advice='go elsewhere').acquire()"],
        env=subprocess_env(), capture_output=True, text=True)
    assert other.returncode == 1 and "FolderInUseError" in other.stderr
    assert "go elsewhere" in other.stderr
  assert not path.exists()
  with files.FolderLock(str(path), what="training run", advice="-"):  # free again
    pass


def test_a_dead_holder_or_a_reused_pid_is_taken_over(tmp_path, caplog):
  path = tmp_path / files.LOCK_FILE
  write_holder(path, pid=dead_pid())
  with caplog.at_level(logging.WARNING), files.FolderLock(str(path), what="x", advice="-"):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert "is no longer running" in caplog.text
  # This PID is alive, but it started at another time: the PID was given to a new process.
  write_holder(path, pid_start="1")
  caplog.clear()
  with caplog.at_level(logging.WARNING), files.FolderLock(str(path), what="x", advice="-"):
    pass
  assert "its PID now belongs to another process" in caplog.text
  # A file torn by a crash names nobody: taken without a word.
  path.write_text('{"host": "vm", "pi')
  caplog.clear()
  with caplog.at_level(logging.WARNING), files.FolderLock(str(path), what="x", advice="-"):
    pass
  assert "Taking over" not in caplog.text


def test_another_hosts_lock_is_kept_until_its_heartbeat_stops(tmp_path, caplog):
  path = tmp_path / files.LOCK_FILE
  write_holder(path, host="other-host", pid=1)
  with pytest.raises(files.FolderInUseError, match="pid 1 on host other-host") as e:
    files.FolderLock(str(path), what="training run", advice="pass another --workdir").acquire()
  assert "taken over once unrefreshed for 10 minutes" in str(e.value)
  old = time.time() - files.STALE_AFTER_S - 60
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING), files.FolderLock(str(path), what="x", advice="-"):
    pass
  assert "has not refreshed it for 11 minutes" in caplog.text


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(files, "HEARTBEAT_S", 0.05)
  path = tmp_path / files.LOCK_FILE
  with files.FolderLock(str(path), what="x", advice="-"):
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.stat(path).st_mtime < 5


def test_full_disk_errors_are_recognised_and_named():
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/4.tmp/x": '
                           "Failed to write 6479 bytes to file 9: No space left on device "
                           "[os_error_code='28']")
  assert files.is_out_of_space(tensorstore)
  assert files.is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
  assert files.is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError("the save failed") from e
  except RuntimeError as chained:
    assert files.is_out_of_space(chained)
  assert not files.is_out_of_space(OSError(errno.EACCES, "Permission denied"))
  error = files.OutOfSpaceError("/nowhere/ckpt", 3_500_000, resume="; it resumes from 40")
  assert str(error).startswith("out of space writing /nowhere/ckpt: the write needs about 3.5 "
                               "MB, ")
  assert str(error).endswith("run the same command again; it resumes from 40.")
  assert "\n" not in str(error) and error.errno == errno.ENOSPC


def test_writing_turns_a_full_disk_into_one_error_and_removes_what_it_wrote(tmp_path):
  tmp = tmp_path / "part.tmp"
  with pytest.raises(files.OutOfSpaceError, match="out of space writing .*part.npz"):
    with files.writing(str(tmp_path / "part.npz"), 10, remove_on_failure=(str(tmp),)):
      tmp.write_bytes(b"half")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert not tmp.exists()
  with pytest.raises(PermissionError):  # anything else passes through unchanged
    with files.writing(str(tmp_path / "x")):
      raise PermissionError("no")


def test_damaged_json_is_named_and_moved_aside_not_overwritten(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"model": {"na')
  with pytest.raises(files.DamagedFileError) as e:
    files.read_json(str(path), advice="Pass --config=X.")
  assert str(e.value).startswith(f"{path} is damaged: not valid JSON (")
  assert str(e.value).endswith("Pass --config=X.") and e.value.problem in str(e.value)
  path.write_bytes(b"\x00\xff\xfe")
  with pytest.raises(files.DamagedFileError, match="not valid JSON"):
    files.read_json(str(path), advice="")
  path.write_text("")
  with pytest.raises(files.DamagedFileError, match="is damaged: empty"):
    files.read_json(str(path), advice="")
  (tmp_path / "config.json.damaged").write_text("older")
  moved = files.move_aside(str(path))
  assert moved.endswith("config.json.damaged-1") and not path.exists()
  assert (tmp_path / "config.json.damaged").read_text() == "older"


def test_library_reports_of_a_full_disk_are_dropped_and_nothing_else():
  noise = logging_utils.DropOutOfSpaceReports()

  def record(msg, exc=None, pathname="/site-packages/orbax/checkpoint/future.py"):
    return logging.LogRecord("absl", logging.ERROR, pathname, 1, msg, None,
                             (type(exc), exc, None) if exc else None)

  assert noise.filter(record("Save failed", exc=RuntimeError("cannot schedule new futures")))
  assert not noise.filter(record("Save failed", exc=OSError(errno.ENOSPC, "No space")))
  assert not noise.filter(record("writing: No space left on device [os_error_code='28']"))
  # After a full disk, Orbax's tracebacks are its aftermath; other records still show.
  assert not noise.filter(record("Save failed", exc=RuntimeError("cannot schedule new futures")))
  assert noise.filter(record("Your own error", exc=RuntimeError("x"), pathname="/me/train.py"))
  assert noise.filter(record("Checkpoint 40 saved"))


def test_closed_loop_callbacks_are_not_printed_and_other_unraisables_are():
  seen = []
  hook = cli._without_closed_loop_callbacks(seen.append)  # pylint: disable=protected-access
  import asyncio
  loop = asyncio.new_event_loop()
  loop.close()
  for call in (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0):
    try:
      call()
    except Exception as e:  # pylint: disable=broad-except
      tb = e.__traceback__.tb_next.tb_next  # as C code calling in sees it: no test frames
      hook(types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                 exc_traceback=tb or e.__traceback__.tb_next))
  assert [type(u.exc_value) for u in seen] == [ZeroDivisionError]
