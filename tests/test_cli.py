"""One command-line style: absl flags, sub-command help, one `error:` line for a bad flag.

The sub-command programs (`convert`, `data`) and `evaluate` run in-process through their
`main(argv)`; usage errors end them with SystemExit(2), as `python -m` would.
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


def test_old_and_misspelt_flags_get_one_line_with_the_fix(tmp_path, capsys):
  _usage_error(convert_cli.main, ["vae", "--src=x", f"--dst={tmp_path}"])
  _one_error_line(capsys, "--dst is now --out", "convert vae --help")
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
  assert config == {"seed": 0}
  shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not any("could not be restored" in m or "read only" in m or "read_only" in m
                 for m in shown), shown
  assert any("Skipping checkpoint" in m for m in shown), shown
