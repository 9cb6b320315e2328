"""Folders shared with other processes and with a finite disk: one writer per folder, a full
disk reported as one line, run metadata that may be damaged.

  * `FolderLock`: a writer (a training run, a sampler, a dataset build) holds a lock file for
    its lifetime, so that a second writer on the same folder is refused at start instead of
    interleaving its files with the first. The lock is an OS lock (`fcntl.flock`, which Linux
    also honours on NFS) on a file that names its holder (host, PID, command, start time); the
    holder refreshes the file's time every `HEARTBEAT_S`. A lock whose holder is gone is taken
    over with one line: on the same host when the PID no longer runs (or is another process
    now), on another host when the heartbeat stopped `STALE_AFTER_S` ago (a job requeued on
    another machine after its first one died).
  * `OutOfSpaceError`, `writing`: an `ENOSPC` anywhere below a write (Python's `OSError`,
    TensorStore's `RESOURCE_EXHAUSTED ... No space left on device`) becomes one message that
    names the path, what the write needed and what is free.
  * `read_json`, `move_aside`: metadata files (`config.json`, manifests) that do not parse are
    named in one line, and a file we replace is kept beside the new one, never deleted.

No JAX here: `data build` uses this module too. Multi-process runs lock once, on process 0
(`diffit_jax.train`, `diffit_jax.sample`): their processes are one writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from typing import Any, Iterator

LOCK_FILE = "diffit_jax.lock"
HEARTBEAT_S = 60.0  # how often a holder touches its lock file
STALE_AFTER_S = 600.0  # a lock of another host whose heartbeat is this old is taken over


def host_name() -> str:
  """This machine's name, as lock files and temporary folders record it."""
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def is_running(pid: int) -> bool:
  """Whether process `pid` exists on this host."""
  try:
    os.kill(pid, 0)  # signal 0 only checks that the process exists
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


def _process_start(pid: int) -> str | None:
  """When process `pid` started, in clock ticks since boot (Linux); None if unknown. A PID
  the system reused for another process has another start time."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the (comm) field
  except (OSError, IndexError):
    return None


# ----------------------------------------------------------------------------------------
# One writer per folder.


class FolderInUseError(RuntimeError):
  """Another live process holds the folder's lock; the message names it and what to do."""


def _describe(holder: dict) -> str:
  command = str(holder.get("command", "?"))
  command = command if len(command) <= 100 else command[:97] + "..."
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (`{command}`, since "
          f"{holder.get('started')})")


class FolderLock:
  """The lock of one writer on a folder, held from `acquire` to `release` (or a `with`).

  Args:
    path: the lock file (e.g. `WORKDIR/diffit_jax.lock`); its folder is created.
    what: what holds it, for messages ("training run", "sampler").
    advice: what a refused user should do, ending the refusal ("pass another --workdir").
  """

  def __init__(self, path: str, *, what: str, advice: str):
    self.path, self.what, self.advice = os.path.abspath(path), what, advice
    self._fd = None
    self._stop = threading.Event()

  def acquire(self) -> "FolderLock":
    """Takes the lock, or raises `FolderInUseError` if a live process holds it."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(10):  # retried only when the file was replaced while it was being opened
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          raise self._refusal(self._read(fd)) from None
        except OSError as e:  # a filesystem without locks: the holder file alone decides
          if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
          if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            continue  # released (unlinked) meanwhile: lock the new file
        except FileNotFoundError:
          continue
        holder = self._read(fd)
        if holder:
          stale = self._why_stale(holder)
          if stale is None:
            raise self._refusal(holder)
          logging.warning("Taking over %s: its holder %s %s.", self.path, _describe(holder), stale)
        self._write(fd)
      except BaseException:
        os.close(fd)
        raise
      self._fd = fd
      threading.Thread(target=self._heartbeat, daemon=True, name="diffit_jax-lock").start()
      return self
    raise FolderInUseError(f"{self.path} keeps changing: another process is taking and "
                           f"releasing it; {self.advice}.")

  def _refusal(self, holder: dict) -> FolderInUseError:
    who = _describe(holder) if holder else "another process"
    return FolderInUseError(
        f"{os.path.dirname(self.path)} is in use: {who} holds its lock ({self.path}). Two "
        f"writers would mix their files: wait for that {self.what} to end or stop it, or "
        f"{self.advice}." + (
            "" if not holder or holder.get("host") == host_name() else
            f" (Another host's process cannot be checked from here: its lock is taken over "
            f"once unrefreshed for {STALE_AFTER_S / 60:.0f} minutes, or delete the file if "
            "that run is gone.)"))

  def _why_stale(self, holder: dict) -> str | None:
    """Why the recorded holder no longer holds the lock, or None if it may still."""
    pid = holder.get("pid")
    if holder.get("host") == host_name() and isinstance(pid, int):
      if not is_running(pid):
        return "is no longer running"
      if holder.get("pid_start") and _process_start(pid) not in (None, holder["pid_start"]):
        return "is no longer running (its PID now belongs to another process)"
      return None
    age = time.time() - os.stat(self.path).st_mtime
    if age > STALE_AFTER_S:
      return f"has not refreshed it for {age / 60:.0f} minutes"
    return None

  @staticmethod
  def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(fd, 1 << 16):
      text += chunk
    try:
      holder = json.loads(text.decode()) if text.strip() else {}
    except ValueError:  # torn by a crash mid-write: nobody can be named as its holder
      return {}
    return holder if isinstance(holder, dict) else {}

  def _write(self, fd: int) -> None:
    record = {"host": host_name(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what}
    data = (json.dumps(record, indent=1) + "\n").encode()
    try:
      with writing(self.path, len(data)):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OutOfSpaceError:
      os.unlink(self.path)  # this process holds it: no one else can be naming themselves
      raise

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    """Removes the lock file (if it is still this lock's) and releases the lock."""
    if self._fd is None:
      return
    self._stop.set()
    with contextlib.suppress(OSError):
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "FolderLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------------------
# Out of space.

_NO_SPACE = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def is_out_of_space(error: BaseException) -> bool:
  """Whether `error`, or an exception it was raised from, is a full disk (or quota)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OutOfSpaceError):
      return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if mentions_out_of_space(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def mentions_out_of_space(text: str) -> bool:
  """Whether an error message says that a disk (or quota) is full."""
  return any(s in text for s in _NO_SPACE)


def human_bytes(n: float) -> str:
  """`n` bytes for a message: "812 bytes", "3.5 MB", "2.2 GB" (decimal units)."""
  if abs(n) < 1000:
    return f"{n:.0f} bytes"
  for unit in ("KB", "MB", "GB"):
    n /= 1000
    if abs(n) < 1000 or unit == "GB":
      return f"{n:.1f} {unit}"


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
  try:
    return shutil.disk_usage(_existing(path)).free
  except OSError:
    return None


def _existing(path: str) -> str:
  """`path`, or its nearest parent that exists."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


class OutOfSpaceError(OSError):
  """The disk (or quota) filled while writing `path`; the message is one line saying how much
  the write needed, how much is free, and that the same command continues once there is room."""

  def __init__(self, path: str, needed: int | None = None, *, resume: str = ""):
    free = free_bytes(path)
    size = f" needs about {human_bytes(needed)}" if needed else ""
    left = f", {human_bytes(free)} free there" if free is not None else ""
    super().__init__(errno.ENOSPC, f"out of space writing {path}: the write{size}{left}. Free "
                     "some space (or point the command elsewhere), then run the same command "
                     f"again{resume}.")
    self.path, self.needed = path, needed

  def __str__(self) -> str:
    return self.strerror


@contextlib.contextmanager
def writing(path: str, needed: int | None = None, *, resume: str = "",
            remove_on_failure: tuple[str, ...] = ()) -> Iterator[None]:
  """Turns a full disk below the `with` block into `OutOfSpaceError(path, needed)`.

  Args:
    path: what the block writes, as the message names it.
    needed: about how many bytes the write takes (None: not said).
    resume: what the rerun continues from (", resuming from checkpoint 40").
    remove_on_failure: files or folders the block was writing, removed on a full disk (so
      nothing half-written is left), whatever else failed.
  """
  try:
    yield
  except OutOfSpaceError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_space(e):
      raise
    error = OutOfSpaceError(path, needed, resume=resume)  # the free space of the full disk
    for leftover in remove_on_failure:
      remove(leftover)
    raise error from e


def check_space(path: str, needed: int, *, resume: str = "") -> None:
  """Raises `OutOfSpaceError` before a write of `needed` bytes to `path` that cannot fit.

  A filesystem that reports no size (some FUSE mounts) is not checked.
  """
  try:
    usage = shutil.disk_usage(_existing(path))
  except OSError:
    return
  if usage.total and usage.free < needed:
    raise OutOfSpaceError(path, needed, resume=resume)


def remove(path: str) -> None:
  """Removes a file or folder if it exists."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def tree_bytes(path: str) -> int:
  """The bytes of the files under `path` (a file's size for a file; 0 if missing)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path)
             for name in names if os.path.isfile(os.path.join(root, name)))


# ----------------------------------------------------------------------------------------
# Metadata that may be damaged.


class DamagedFileError(ValueError):
  """A metadata file that does not parse; the message names it and what to do.

  `problem` is the first half of the message alone ("PATH is damaged: ..."), for callers
  that say themselves what they do about it.
  """

  def __init__(self, path: str, problem: str, advice: str):
    self.path, self.problem = path, f"{path} is damaged: {problem}"
    super().__init__(f"{self.problem}. {advice}")


def read_json(path: str, *, advice: str) -> Any:
  """The JSON in `path`; a file that does not parse is one `DamagedFileError` naming it.

  Args:
    path: the file (FileNotFoundError if missing).
    advice: what to do about a damaged one ("pass --config=..., or move it aside").
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data.decode())
  except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
    what = "empty" if not data.strip() else f"not valid JSON ({e})"
    raise DamagedFileError(path, what, advice) from None


def move_aside(path: str, tag: str = "damaged") -> str:
  """Renames `path` to `PATH.TAG` (or `PATH.TAG-N`, never over a file); returns the new path."""
  new, n = f"{path}.{tag}", 1
  while os.path.exists(new):
    new, n = f"{path}.{tag}-{n}", n + 1
  os.rename(path, new)
  return new


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically (a temporary file renamed over it); on a full
  disk, an `OutOfSpaceError` and no temporary file left behind."""
  tmp = path + ".tmp"
  data = json.dumps(value, indent=2, sort_keys=True)
  with writing(path, len(data), remove_on_failure=(tmp,)):
    with open(tmp, "w") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
