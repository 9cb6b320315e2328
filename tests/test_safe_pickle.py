"""Fault injection on `python -m diffit_jax.convert`: crafted `.pth` files and user mistakes.

A `.pth` is a pickle; these tests hand the real CLI pickles whose `__reduce__` runs a shell
command, in both `.pth` formats, and check that nothing runs, that the refusal names the
global, and that every user error is one `error: ...` line with exit status 2.
"""

import os
import pickle
import zipfile

import numpy as np
import pytest

from diffit_jax.convert import inception, safe_pickle
from diffit_jax.convert.safetensors_io import ConversionError
from helpers import run_module


class _Shell:
  """Unpickling this runs `touch MARKER` (what a crafted .pth does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch '{self.marker}'",)


def _convert(*args):
  return run_module("diffit_jax.convert", *args, timeout=120)


def _assert_user_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # No traceback.
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def _legacy_pth(path, marker):
  # The legacy format starts with a pickled magic number: the payload sits in its place.
  path.write_bytes(pickle.dumps(_Shell(marker), protocol=2))


def _zip_pth(path, marker):
  # The zip format (torch >= 1.6): the payload is the archive's data.pkl.
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"w": _Shell(marker)}, protocol=2))
    zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("make", [_legacy_pth, _zip_pth], ids=["legacy", "zip"])
def test_crafted_pth_runs_no_code(make, tmp_path):
  src, marker, dst = tmp_path / "evil.pth", tmp_path / "PWNED", tmp_path / "out"
  make(src, marker)
  result = _convert("inception", f"--src={src}", f"--out={dst}")
  assert not marker.exists(), "the crafted pickle ran a shell command"
  _assert_user_error(result, f"refusing to load {src}", f"global {os.system.__module__}.system")
  assert not dst.exists()


def test_convert_user_errors_are_one_line(tmp_path):
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a pickle at all")
  _assert_user_error(_convert("inception", f"--src={junk}", f"--out={tmp_path / 'o'}"),
                     "is not a PyTorch .pth file")
  _assert_user_error(_convert("inception", f"--src={junk}"), "--out is required", "--help")
  assert not (tmp_path / "o").exists()


def test_missing_pth_is_a_conversion_error(tmp_path):
  with pytest.raises(ConversionError, match="no such file.*Download"):
    inception.read_torch_state_dict(str(tmp_path / "nope.pth"))


def test_restricted_unpickler_refuses_globals_in_plain_records(tmp_path):
  """The legacy format's small records (magic, protocol, keys) go through it too."""
  path = tmp_path / "x.pth"
  path.write_bytes(pickle.dumps(np.int64(7)))  # numpy's reconstructor: not a state dict global.
  with open(path, "rb") as f, pytest.raises(ConversionError, match="numpy"):
    safe_pickle.load(f, source=str(path))
  path.write_bytes(pickle.dumps([1, "two", {"x": (3.0,)}]))
  with open(path, "rb") as f:
    assert safe_pickle.load(f, source=str(path)) == [1, "two", {"x": (3.0,)}]
