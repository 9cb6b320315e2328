"""What the command lines share: absl flags, and a user's mistake is one `error: ...` line, exit 2.

Every command's `main(argv)` is `run_command` (or `run_subcommand`: `convert` and `data` take
a sub-command as their first word, `python -m diffit_jax.convert diffit --src=...`): absl
flags (`--x=v`, booleans `--x` / `--nox`) defined when the command runs, in a `FlagValues` of
its own, absl's log lines, and one definition of the errors a user can cause
(`is_user_error`: a bad flag, config or file, a missing one, a full disk, ...), each reported
by its message, which says what was wrong and how to fix it, without a traceback; anything
else is a bug and keeps its traceback.

The flags share one vocabulary: what a command reads is `--src`, what it writes `--out`, a
pixel size `--resolution`, a number of sampler steps `--num_steps`, a config `--config`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Mapping, NamedTuple, NoReturn, Sequence

USER_ERROR_STATUS = 2  # The status for bad arguments (argparse's too), used for every user error.
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def start_logging() -> None:
  """Logs as an absl app does (`I0101 12:00:00.000000 123 train.py:609] message` lines on
  stderr, INFO and up) and silences library messages a user cannot act on (see
  `quiet_library_noise`); every command calls it before its work."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.use_absl_handler()
  if not flags.FLAGS.is_parsed():  # absl's own flags, at their defaults: log to stderr
    flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.INFO)  # as `app.run` does: the root logger at INFO
  quiet_library_noise()


def quiet_library_noise() -> None:
  """Silences library messages a user cannot act on (`start_logging` calls it).

  Each at its source, and only the message named (a warning about the user's own input or
  a real failure still shows):
    * The INFO lines libraries log through absl's logger (Orbax names every file it reads
      or writes): that logger is set to WARNING; diffit_jax's own INFO lines still show.
    * JAX's INFO line "Unable to initialize backend 'tpu': ... Failed to open libtpu.so" on a
      machine without a TPU (libtpu installed, e.g. Colab): the logger of
      `jax._src.xla_bridge` is set to WARNING (its real warnings, such as a GPU it cannot
      use, still show).
    * OpenCV, where it is installed (e.g. Colab; tfds decodes images with it): its own
      warnings are limited to errors, `OPENCV_LOG_LEVEL=ERROR`, read when cv2 loads,
      unless the user set it.
    * Orbax's notes on every read-only checkpoint manager (a sampler's): "read_only=True,
      setting create=False", "Given directory is read only=...": those messages of the
      absl logger are dropped.
    * A full disk: Orbax's and asyncio's log records of every write that failed for lack of
      space (the command reports it once, as one `error:` line), and TensorStore's printed
      `RuntimeError: Event loop is closed` for each write still queued on the event loop
      Orbax closed after the failure (raised by asyncio's `call_soon_threadsafe` when a C
      callback reaches a closed loop, and printed as unraisable: never an error of the
      user's or of diffit_jax's).
    * tfds's note, once per process that decodes images, that OpenCV is not installed (it
      decodes with PIL, as diffit_jax intends); grain's worker processes drop it too
      (`data.pipeline.PrepareImage`).
  tfds's download banner and Orbax's notes about checkpoint items a sampler does not read
  are silenced where those libraries are called (`data.folder`, `checkpoint`), so library
  users are covered too.
  """
  from diffit_jax import logging_utils  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging_utils.drop_messages(*logging_utils.ORBAX_READ_ONLY_NOTES)
  logging_utils.drop_messages(logging_utils.TFDS_OPENCV_NOTE)
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, logging_utils.DropOutOfSpaceReports) for f in logger.filters):
      logger.addFilter(logging_utils.DropOutOfSpaceReports())
  if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
    sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)


def _without_closed_loop_callbacks(hook: Callable) -> Callable:
  """`sys.unraisablehook` that does not print a C callback's `RuntimeError: Event loop is
  closed` from asyncio's `call_soon_threadsafe` (see `quiet_library_noise`); every other
  unraisable exception goes to `hook`."""
  def unraisablehook(unraisable):
    frames = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        and frames[:1] == ["call_soon_threadsafe"]):
      return
    hook(unraisable)
  unraisablehook.drops_closed_loop_callbacks = True
  return unraisablehook


def report_user_error(error: BaseException | str) -> int:
  """Prints `error: MESSAGE` on stderr; returns the exit status to end the command with."""
  print(f"error: {error}", file=sys.stderr)
  return USER_ERROR_STATUS


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is one a user can fix from its message, so a command reports it as one
  `error:` line (exit status 2) instead of a traceback.

  Those are: a value refused (`ValueError`: a bad flag or config, `config_lib.ConfigError`;
  a damaged file, `files.DamagedFileError`; a workdir whose checkpoints are all damaged,
  `checkpoint.CorruptCheckpointError`; weights that do not convert, `ConversionError`), a
  file missing, in the way or unreadable, or a full disk (`OSError`, `files.OutOfSpaceError`),
  an output folder another process writes (`files.FolderInUseError`), and a run that
  diverged (`train.NonFiniteLossError`, which names the newest good checkpoint).
  """
  from diffit_jax import files  # pylint: disable=g-import-not-at-top

  train = sys.modules.get("diffit_jax.train")  # only a command that imported it can diverge
  diverged = (train.NonFiniteLossError,) if train else ()
  return isinstance(error, (ValueError, OSError, files.FolderInUseError, *diverged))


class UsageError(ValueError):
  """A command line that does not parse, or whose flags do not go together; its message is
  the `error:` line."""


def _unknown_flag_message(e: Any, flag_values: Any) -> str:
  """absl's message, or `--noX` for a `--no_X` boolean."""
  name = e.flagname
  if name.startswith("no_") and name[3:] in flag_values and flag_values[name[3:]].boolean:
    return f"unknown flag --{name}; booleans are negated as --no{name[3:]}"
  return str(e)


def parse_flags(argv: Sequence[str], flag_values: Any) -> list[str]:
  """Parses absl flags; raises `UsageError` with a one-line message instead of absl's usage.

  A `--config` that its parser refuses (see `config_lib.DEFINE_config_file`: no such config,
  a variant or field it does not have) raises that error itself, `ConfigError` or
  `FileNotFoundError`: it is the config's, reported as a run reports a config it refuses.

  Args:
    argv: the command line, program name first.
    flag_values: the `flags.FlagValues` to parse into.

  Returns:
    The arguments that are not flags, program name first.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  from diffit_jax.config_lib import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    return flag_values(list(argv))
  except flags.UnrecognizedFlagError as e:
    raise UsageError(_unknown_flag_message(e, flag_values)) from None
  except (flags.Error, ValueError, FileNotFoundError) as e:
    missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
    if missing:
      raise UsageError(f"--{missing.group(1)} is required") from None
    # absl wraps a parser's ValueError in "flag --config=...: "; an OSError it lets through.
    error = e.__context__ if isinstance(e.__context__, ConfigError) else e
    if isinstance(error, (ConfigError, FileNotFoundError)):
      raise error from None
    raise UsageError(e) from None


def _usage_error(prog: str, message: Any) -> NoReturn:
  sys.exit(report_user_error(f"{prog}: {message} (see `{prog} --help`)"))


def _parse_command_line(argv: Sequence[str], prog: str, flag_values: Any) -> None:
  """`parse_flags`; a command line that does not parse ends the command (`SystemExit(2)`)
  with one `error:` line that names the command and points to its `--help`."""
  try:
    rest = parse_flags([prog, *argv], flag_values)
  except UsageError as e:
    words = [a for a in argv if not a.startswith("-")]
    missing = re.fullmatch(r"--(\w+) is required", str(e))
    if missing and words:  # e.g. the positional argument of an earlier version
      e = f"{e}: every input is a flag now, e.g. --{missing.group(1)}={words[0]}"
    _usage_error(prog, e)
  if rest[1:]:
    _usage_error(prog, f"unexpected argument {rest[1]!r}; every input is a flag (--src=..., "
                       "--out=...)")


def _summary(doc: str) -> str:
  """What `--help` shows above the flags: a docstring's first paragraph and its examples
  (the indented paragraphs right after it)."""
  first, *rest = doc.strip().split("\n\n")
  shown = [first]
  for paragraph in rest:
    if not paragraph.startswith(" "):
      break
    shown.append(paragraph)
  return "\n\n".join(shown)


def run_command(argv: Sequence[str], *, prog: str, doc: str,
                define_flags: Callable[[Any], None], run: Callable[[Any], int | None]) -> int:
  """Runs one command: fresh absl flags defined by `define_flags(flag_values)`, then `run`.

  The flags live in their own `FlagValues` (not absl's global `FLAGS`), so a command can run
  more than once in one process (tests) and `--help` lists only its own flags.

  Args:
    argv: the arguments after the program (and sub-command) name.
    prog: how the user typed the command, for messages (`python -m diffit_jax.data build`).
    doc: the docstring whose first paragraph `--help` shows above the flags.
    define_flags: defines the command's flags in the `FlagValues` it is given.
    run: the command, given the parsed `FlagValues` (read as `values.src`); returns the
      exit status (None: 0).

  Returns:
    `run`'s exit status. A command line that does not parse ends the command with
    `SystemExit(2)`, an error of the user's (`is_user_error`, a refused `--config` too) with
    status 2, each with one `error:` line; `--help` prints the help and returns 0.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  start_logging()
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  if any(a in HELP_FLAGS for a in argv):
    # Every flag here is this command's: `flag_values` is its own, not absl's global FLAGS.
    listed = "\n".join(line for line in flag_values.get_help(include_special_flags=False)
                       .splitlines() if line.startswith(" "))  # not the modules' names
    print(f"{_summary(doc)}\n\nflags of `{prog}`:\n{listed}")
    return 0
  from diffit_jax import files  # pylint: disable=g-import-not-at-top

  try:
    _parse_command_line(argv, prog, flag_values)
    return run(flag_values) or 0
  except Exception as e:  # pylint: disable=broad-except
    if files.is_out_of_space(e) and not isinstance(e, files.OutOfSpaceError):
      e = files.OutOfSpaceError(getattr(e, "filename", None) or "--out")  # below any write
    if not is_user_error(e):
      raise
    return report_user_error(e)


class Command(NamedTuple):
  """A sub-command: `module.define_flags(flag_values)` and `module.run(flag_values)`.

  The module is imported only when its command runs; `define_flags` and `run` may name
  other functions of it. `--help` shows the first paragraph of `doc` (default: the module's
  docstring).
  """
  summary: str
  module: str
  define_flags: str = "define_flags"
  run: str = "run"
  doc: str | None = None


def run_subcommand(argv: Sequence[str], *, prog: str, doc: str,
                   commands: Mapping[str, Command]) -> int:
  """Runs `prog COMMAND --flags...`: the first word picks a module, the rest are its flags.

  Args:
    argv: the arguments after the program name.
    prog: how the user typed the program (`python -m diffit_jax.convert`).
    doc: the program's help text, shown above the list of commands.
    commands: name -> its `Command`.

  Returns:
    The command's exit status (see `run_command`).
  """
  listing = "\n".join(f"  {name:<10} {c.summary}" for name, c in commands.items())
  usage = (f"{doc.rstrip()}\n\ncommands (`{prog} COMMAND --help` lists a command's flags):\n"
           f"{listing}")
  if not argv or argv[0] in HELP_FLAGS:
    if not argv:
      _usage_error(prog, f"name a command: {', '.join(commands)}")
    print(usage)
    return 0
  name = argv[0]
  if name not in commands:
    close = difflib.get_close_matches(name, list(commands), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    _usage_error(prog, f"unknown command {name!r}; {hint}commands: {', '.join(commands)}")
  command = commands[name]
  module = importlib.import_module(command.module)
  return run_command(argv[1:], prog=f"{prog} {name}",
                     doc=command.doc or module.__doc__ or command.summary,
                     define_flags=getattr(module, command.define_flags),
                     run=getattr(module, command.run))
