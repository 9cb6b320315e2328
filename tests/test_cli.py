"""One command-line style: absl flags, sub-command help, one `error:` line for a bad flag.

Every command runs in-process through its `main(argv)`, as `python -m` runs it; usage errors
end it with SystemExit(2), a refused run returns status 2.
"""

import os

import pytest

from diffit_jax import evaluate
from diffit_jax.convert import __main__ as convert_cli
from diffit_jax.data import __main__ as data_cli
from helpers import run_module


def _one_error_line(capsys, *fragments):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in err[0], err[0]
  return err[0]


def _usage_error(main, argv):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2


def test_help_lists_commands_then_one_commands_flags(capsys):
  assert convert_cli.main(["--help"]) == 0
  text = capsys.readouterr().out
  for command in ("diffit", "export", "vae", "inception"):
    assert f"\n  {command} " in text, text
  assert convert_cli.main(["diffit", "--help"]) == 0
  text = capsys.readouterr().out
  for flag in ("--src", "--out", "--config", "--[no]overwrite"):
    assert flag in text, text
  assert "--norm_num_groups" not in text and "--flagfile" not in text  # vae's; absl's
  assert data_cli.main(["build", "--help"]) == 0
  assert "--split: <train|test>" in capsys.readouterr().out
  assert evaluate.main(["--help"]) == 0
  assert "--[no]precision_recall" in capsys.readouterr().out


def test_unknown_and_misspelt_flags_get_one_line_with_the_fix(tmp_path, capsys):
  _usage_error(convert_cli.main, ["vae", "--src=x", f"--dst={tmp_path}"])
  _one_error_line(capsys, "Unknown command line flag 'dst'", "convert vae --help")
  _usage_error(data_cli.main, ["build", "--src=x", "--out=y", "--no_strict"])
  _one_error_line(capsys, "--nostrict")
  _usage_error(evaluate.main, ["--ref=a", "--samples=b", "--inception=c", "--precison_recall"])
  _one_error_line(capsys, "Did you mean: precision_recall")
  _usage_error(convert_cli.main, ["inception", "--src=x"])
  _one_error_line(capsys, "--out is required")
  _usage_error(data_cli.main, ["info", str(tmp_path)])  # the positional form of old
  _one_error_line(capsys, f"--src={tmp_path}")
  _usage_error(convert_cli.main, ["incepton", "--src=x"])
  _one_error_line(capsys, "did you mean 'inception'")
  _usage_error(convert_cli.main, [])
  _one_error_line(capsys, "name a command: diffit, export, vae, inception")


def test_flags_parse_afresh_on_every_call(tmp_path, capsys):
  """A second in-process call neither redefines flags nor keeps the first call's values."""
  for _ in range(2):
    assert data_cli.main(["info", f"--src={tmp_path / 'missing'}"]) == 2
    _one_error_line(capsys, "is neither a built dataset")


# ---------------------------------------------------------------------------------------------
# Noise a user cannot act on.


def test_main_prints_no_tpu_backend_line_on_cpu():
  """JAX's INFO "Unable to initialize backend 'tpu': ... libtpu.so" is not shown on a CPU."""
  result = run_module("diffit_jax.main", "--config=configs/mnist_demo.py:runlocal",
                      "--dry_run", "--nodry_run_memory", timeout=300)
  assert result.returncode == 0, result.stderr
  assert "trainable_params" in result.stdout
  assert "Unable to initialize backend" not in result.stderr, result.stderr
  assert "libtpu" not in result.stderr, result.stderr


def test_reading_ema_weights_logs_no_orbax_notes(tmp_path, caplog):
  """A sampler reads only the EMA and config items: no Orbax warning per unread item, none
  about the read-only folder; a real warning (a skipped checkpoint) still shows."""
  import logging

  import numpy as np

  from diffit_jax import checkpoint

  saver = checkpoint.TrainCheckpointer(str(tmp_path), async_save=False)
  state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(1),
           "ema_params": {"w": np.full(3, 2, np.float32)}}
  saver.save(1, state, config={"seed": 0})
  saver.save(2, state, config={"seed": 0})
  saver.wait_until_finished()
  saver.close()
  os.remove(os.path.join(tmp_path, "checkpoints", "2", "config", "metadata"))  # a broken one

  with caplog.at_level(logging.WARNING):
    ema, config = checkpoint.load_run_params(str(tmp_path))
  np.testing.assert_array_equal(ema["w"], 2)
  assert config.seed == 0  # the saved {"seed": 0}, its other fields from the schema
  shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not any("could not be restored" in m or "read only" in m or "read_only" in m
                 for m in shown), shown
  assert any("Skipping checkpoint" in m for m in shown), shown


# ---------------------------------------------------------------------------------------------
# One path for a user's mistake, in every command.


def _user_error_commands(tmp_path):
  """(name, main, argv) of each command, with a command line whose run it refuses."""
  from diffit_jax import encode
  from diffit_jax import main as train_cli
  from diffit_jax import sample

  missing = tmp_path / "missing"
  return [
      ("main", train_cli.main, ["--config=mnist_demo"]),  # no --workdir
      ("sample", sample.main, [f"--workdir={missing}"]),
      ("encode", encode.main, ["--data=mnist_demo"]),  # no --vae, --out
      ("convert", convert_cli.main, ["inception", f"--src={missing}.pth", f"--out={missing}"]),
      ("data", data_cli.main, ["info", f"--src={missing}"]),
      ("evaluate", evaluate.main, [f"--ref={missing}", f"--samples={missing}",
                                   f"--inception={missing}"]),
  ]


def test_every_command_reports_a_user_error_through_one_path(tmp_path, capsys, monkeypatch):
  """Each of the six commands ends a run it refuses with status 2 and one `error:` line,
  written by `cli.run_command` through `cli.report_user_error`; no command reports its own."""
  import inspect

  from diffit_jax import cli

  report = cli.report_user_error
  reported = []
  monkeypatch.setattr(cli, "report_user_error", lambda e: reported.append(e) or report(e))
  for name, main, argv in _user_error_commands(tmp_path):
    reported.clear()
    assert main(argv) == cli.USER_ERROR_STATUS, name
    _one_error_line(capsys)
    assert len(reported) == 1 and cli.is_user_error(reported[0]), (name, reported)
    module = inspect.getmodule(main)
    assert "report_user_error" not in inspect.getsource(module), module.__name__
    assert not os.path.exists(tmp_path / "missing"), name


# Library state a module may change at import: absl's global flags, loggers' levels,
# filters and handlers, the unraisable-exception hook, the environment. The libraries
# diffit_jax builds on are imported first (they register absl flags of their own).
IMPORT_STATE_SCRIPT = r"""
import importlib, logging, os, pkgutil, sys
import absl.app, flax.nnx, grain, jax, ml_collections.config_flags, optax, orbax.checkpoint
import tensorflow_datasets
from absl import flags

def state():
  loggers = {name: (l.level, [type(f).__name__ for f in l.filters], list(l.handlers))
             for name, l in [("root", logging.root), *logging.Logger.manager.loggerDict.items()]
             if isinstance(l, logging.Logger) and (l.level or l.filters or l.handlers)}
  return dict(flags=sorted(flags.FLAGS), parsed=flags.FLAGS.is_parsed(), loggers=loggers,
              unraisablehook=sys.unraisablehook, environ=dict(os.environ))

before = state()
import diffit_jax
names = [m.name for m in pkgutil.walk_packages(diffit_jax.__path__, "diffit_jax.")]
modules = [importlib.import_module(name) for name in names]
for name in ("diffit_jax.main", "diffit_jax.sample", "diffit_jax.encode"):
  importlib.reload(sys.modules[name])  # a second import (a notebook cell run again)
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
print(len(modules), "modules;", "changed:", changed)
"""


def test_importing_diffit_jax_changes_no_process_state():
  """Importing any module of diffit_jax (the commands' too) defines no absl flag, sets no log
  level, filter or handler, and touches no hook or environment variable: the commands do
  that when they run (`cli.start_logging`), so a notebook or another program keeps its own."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", IMPORT_STATE_SCRIPT], cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert "changed: {}" in result.stdout, result.stdout
  assert int(result.stdout.split()[0]) > 40  # every module, the commands' included
