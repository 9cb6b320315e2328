"""What the command lines share: a mistake a user can fix is one `error: ...` line, exit status 2.

Errors a user can cause (a missing or malformed file, a refused pickle global, a bad
argument) are reported by their message, which says what was wrong and how to fix it,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USER_ERROR_STATUS = 2  # argparse's status for bad arguments, used for every user error.


def report_user_error(error: BaseException | str) -> int:
  """Prints `error: MESSAGE` on stderr; returns the exit status to end the command with."""
  print(f"error: {error}", file=sys.stderr)
  return USER_ERROR_STATUS


class ArgumentParser(argparse.ArgumentParser):
  """An `argparse.ArgumentParser` whose usage errors are one `error:` line, exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(report_user_error(f"{self.prog}: {message} (see `{self.prog} --help`)"))
