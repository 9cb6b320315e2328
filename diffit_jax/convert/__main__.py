"""`python -m diffit_jax.convert COMMAND --src=... --out=...`: weights in and out of diffit_jax.

    python -m diffit_jax.convert diffit --src=diffit_256.safetensors --out=ckpt/diffit_256
    python -m diffit_jax.convert vae --src=sd-vae-ft-ema --out=ckpt/sd_vae_ema
    python -m diffit_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth \\
        --out=ckpt/inception
    python -m diffit_jax.convert export --src=CKPT_OR_WORKDIR --out=diffit.safetensors

Each command is a module of `diffit_jax.convert` with `define_flags(flag_values)` and
`run(flag_values)`, imported only when its command runs. Nothing is written on error; an
error the user can fix is one `error: ...` line, exit status 2.
"""

import sys

from diffit_jax import cli

COMMANDS = {
    "diffit": cli.Command("official latent DiffiT safetensors -> diffit_jax checkpoint",
                          "diffit_jax.convert.diffit"),
    "export": cli.Command("diffit_jax latent DiffiT checkpoint -> official-layout safetensors",
                          "diffit_jax.convert.export"),
    "vae": cli.Command("diffusers / LDM SD-VAE weights -> Flax VAE checkpoint",
                       "diffit_jax.convert.vae"),
    "inception": cli.Command("pytorch-fid Inception .pth -> Flax Inception checkpoint",
                             "diffit_jax.convert.inception"),
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  return cli.run_subcommand(argv, prog="python -m diffit_jax.convert", doc=__doc__,
                            commands=COMMANDS)


if __name__ == "__main__":
  sys.exit(main())
