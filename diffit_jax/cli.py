"""What the command lines share: a mistake a user can fix is one `error: ...` line, exit status 2.

Errors a user can cause (a missing or malformed file, a refused pickle global, a bad
argument) are reported by their message, which says what was wrong and how to fix it,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

USER_ERROR_STATUS = 2  # argparse's status for bad arguments, used for every user error.


def report_user_error(error: BaseException | str) -> int:
  """Prints `error: MESSAGE` on stderr; returns the exit status to end the command with."""
  print(f"error: {error}", file=sys.stderr)
  return USER_ERROR_STATUS


class ArgumentParser(argparse.ArgumentParser):
  """An `argparse.ArgumentParser` whose usage errors are one `error:` line, exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(report_user_error(f"{self.prog}: {message} (see `{self.prog} --help`)"))


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """`app.run(main, flags_parser=cli.parse_absl_flags)`: absl flags whose errors are one line.

  An unknown or malformed flag, a missing required one, or a `--config` that its parser
  refuses (see `config_lib.DEFINE_config_file`) ends the command with `error: ...` and
  exit status 2, where absl would print its usage text and exit with 1.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  from diffit_jax.config_lib import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, FileNotFoundError) as e:
    cause = e.__context__  # absl wraps a parser's error in "flag --config=...: "
    sys.exit(report_user_error(cause if isinstance(cause, ConfigError) else e))
