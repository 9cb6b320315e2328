"""`python -m diffit_jax.convert {diffit,export,vae,inception} --src=... --dst=...`.

Each sub-command is a module of `diffit_jax.convert` with `add_arguments(parser)`
and `run(args)`. Modules are imported only when their sub-command runs.
"""

import importlib
import sys

from diffit_jax import cli

SUBCOMMANDS = {
    "diffit": ("diffit", "official latent DiffiT safetensors -> diffit_jax checkpoint"),
    "export": ("export", "diffit_jax latent DiffiT checkpoint -> official-layout safetensors"),
    "vae": ("vae", "diffusers / LDM SD-VAE weights -> Flax VAE checkpoint"),
    "inception": ("inception", "pytorch-fid Inception .pth -> Flax Inception checkpoint"),
}


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog="python -m diffit_jax.convert", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  modules = {}
  for name, (module_name, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    try:
      modules[name] = importlib.import_module(f"diffit_jax.convert.{module_name}")
    except ModuleNotFoundError as e:
      if e.name != f"diffit_jax.convert.{module_name}":
        raise
      continue
    modules[name].add_arguments(p)
  args = parser.parse_args(argv)
  if args.command not in modules:
    parser.error(f"converter {args.command!r} is not available in this version of diffit_jax")
  return modules[args.command].run(args) or 0


if __name__ == "__main__":
  from diffit_jax.convert.safetensors_io import ConversionError
  try:
    sys.exit(main())
  except (ConversionError, FileExistsError, FileNotFoundError, PermissionError) as e:
    sys.exit(cli.report_user_error(e))  # a user error: the message, not a traceback
