"""Test-wide set-up and the fixtures several test modules use.

Eight host CPU devices, so that mesh and sharding tests run anywhere, and JAX's persistent
compilation cache, for the test process and (through the environment) every command a test
starts: on a small CPU most of a test's time is XLA compiling, and many tests compile the
same programs (the tiny network's train step, its samplers). Plain helpers are in
tests/helpers.py.
"""

import os
import socket

import pytest

# In the user's own cache folder: JAX trusts its cache, so not a world-writable /tmp path.
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffit_jax", "xla_test_cache")
# Must be set before JAX is imported (its config reads them then) and initialises backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
# Every program, not only those that take a second to compile: a command a test starts
# compiles dozens of small ones (its sampler, its metrics, its data pipeline's), each one
# again in the next command.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from helpers import REPO, installed_env  # noqa: E402  (imports JAX and diffit_jax)


@pytest.fixture(scope="session")
def mount_namespace() -> list[str] | None:
  """The command prefix that runs a command in a mount namespace of its own, in which it may
  mount a small tmpfs (a real filesystem that fills up, seen by nothing else); None where
  this machine allows none (neither root nor user namespaces)."""
  import shutil
  import subprocess

  if shutil.which("unshare") is None:
    return None
  command = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
  probe = subprocess.run([*command, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True)
  return command if probe.returncode == 0 else None


# Leaves `$1` KB free on the tmpfs at $MNT (a filler file), for the scripts run in a
# `mount_namespace`.
FILL_SHELL_FUNCTION = r"""
fill() {
  rm -f "$MNT/filler"
  dd if=/dev/zero of="$MNT/filler" bs=1k count=$(( $(df --output=avail "$MNT" | tail -1) - $1 )) 2>/dev/null
}
"""


@pytest.fixture(scope="session")
def run_on_small_disk(mount_namespace):
  """`run(script, mnt, size_kb, env) -> CompletedProcess`: a bash script run from the
  repository with a tmpfs of `size_kb` mounted at `mnt` ($MNT), and `fill N` to leave N KB
  free on it. None where no mount namespace can be made (the test then skips, saying so)."""
  import subprocess

  if mount_namespace is None:
    return None

  def run(script: str, mnt, size_kb: int, env: dict[str, str], **kwargs):
    os.makedirs(mnt, exist_ok=True)
    body = (f'set -u\nmount -t tmpfs -o size={size_kb}k tmpfs "$MNT"\n'
            + FILL_SHELL_FUNCTION + script + '\numount "$MNT"\n')
    return subprocess.run([*mount_namespace, "bash", "-c", body], cwd=REPO,
                          env={**env, "MNT": str(mnt)}, capture_output=True, text=True,
                          **kwargs)

  return run


@pytest.fixture
def reported_error(monkeypatch):
  """`reported_error(main, argv) -> exception`: runs a command's `main(argv)` in-process,
  checks that it ended with the user-error status, and returns the one exception it
  reported as its `error:` line (to check its type and message)."""
  from diffit_jax import cli

  def run(main, argv):
    reported = []
    monkeypatch.setattr(cli, "report_user_error",
                        lambda error: reported.append(error) or cli.USER_ERROR_STATUS)
    assert main(list(argv)) == cli.USER_ERROR_STATUS
    (error,) = reported
    return error

  return run


@pytest.fixture
def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on, for a local JAX coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ----------------------------------------------------------------------------------------
# diffit_jax as a user gets it: a wheel, installed into a fresh virtual environment.


@pytest.fixture(scope="session")
def installed_python(tmp_path_factory) -> str:
  """The interpreter of a fresh virtual environment holding diffit_jax from a wheel.

  The wheel is built (`pip wheel --no-build-isolation`) from a copy of the package's sources,
  so the checkout gets no `build/` folder, and installed non-editable with pip, offline. The
  dependencies are not downloaded: a `.pth` file puts this interpreter's site-packages folders
  behind the fresh environment's own. Their `.pth` files (an editable install's finder, a
  path to the checkout) are not run, since Python reads those only in its own site folders.
  """
  import shutil
  import subprocess
  import sys
  import sysconfig

  root = tmp_path_factory.mktemp("installed")
  src = root / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("diffit_jax", "configs"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  shutil.copy(os.path.join(REPO, "setup.py"), src / "setup.py")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                  "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                 check=True, cwd=root)
  (wheel,) = (root / "dist").glob("diffit_jax-*.whl")

  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        check=True, capture_output=True, text=True).stdout.strip()
  deps = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")
          and os.path.isdir(p) and not os.path.isdir(os.path.join(p, "diffit_jax"))]
  deps.append(sysconfig.get_path("purelib"))
  with open(os.path.join(site, "_test_dependencies.pth"), "w") as f:
    f.write("\n".join(dict.fromkeys(deps)) + "\n")
  # pip comes from those folders too; --no-index: the requirements must all be met already.
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", str(wheel)], check=True,
                 cwd=root, env=installed_env())
  return python
