"""Loading the python-file configs in `configs/` (each defines `get_config(arg=None)`).

`load_config("configs/ffhq64.py:runlocal")` imports the file and calls
`get_config("runlocal")`, the same thing `--config=configs/ffhq64.py:runlocal` does
through `ml_collections.config_flags`. Configs use it to start from a base config.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(spec: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` and returns `get_config(arg)`.

  Args:
    spec: a config file path, optionally followed by `:arg`.
    relative_to: a file whose folder relative paths are resolved against (pass
      `__file__` from inside a config to load a sibling).
  """
  path, _, arg = spec.partition(":")
  if relative_to is not None and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist; configs live in configs/*.py.")
  name = "_diffit_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(arg=None).")
  return module.get_config(arg or None)
