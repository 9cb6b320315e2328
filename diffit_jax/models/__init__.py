"""The DiffiT networks: TMSA, the latent DiffiT and the image-space DiffiT.

`build_model(config.model, rngs=...)` is the one place a network is made from a
config; every network has the call signature `model(x, t, y=None, *, rng=None)`
with NHWC `x` and returns an NHWC prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffit_jax.models.image import DiffiTResBlock, ImageDiffiT
from diffit_jax.models.latent import LATENT_SIZES, LatentDiffiT, latent_variant
from diffit_jax.models.tmsa import TMSA, DiffiTBlock

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# A latent model outside the size table: `config.model.variant = "custom"` with the sizes
# as explicit fields (the converter writes this for files that match no table row).
CUSTOM_VARIANT = "custom"
SIZE_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


def latent_sizes(model_config: Any) -> dict[str, int]:
  """depth / hidden_size / num_heads / patch_size of a latent `config.model`."""
  if model_config.variant != CUSTOM_VARIANT:
    return latent_variant(model_config.variant)
  missing = [k for k in SIZE_FIELDS if model_config[k] is None]
  if missing:
    raise ValueError(f"config.model.variant={CUSTOM_VARIANT!r} needs {missing} as well.")
  return {k: int(model_config[k]) for k in SIZE_FIELDS}


def model_kwargs(model_config: Any) -> tuple[type[nnx.Module], dict]:
  """Maps a `config.model` ConfigDict to (network class, constructor kwargs)."""
  cfg = dict(model_config)
  name = cfg.pop("name")
  dtype = cfg.pop("dtype")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={dtype!r}; use one of {sorted(DTYPES)}.")
  cfg["dtype"] = DTYPES[dtype]
  if name == "latent":
    cfg.update(latent_sizes(model_config))
    cfg.pop("variant")
    cfg["window_size"] = cfg["window_size"] or None  # 0 / None: the whole grid
    return LatentDiffiT, cfg
  if name == "image":
    cfg["channels"] = tuple(cfg["channels"])
    cfg["num_blocks"] = tuple(cfg["num_blocks"])
    return ImageDiffiT, cfg
  raise ValueError(f"config.model.name={name!r}; use 'latent' or 'image'.")


def build_model(model_config: Any, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
  """Builds the network described by `config.model` (`overrides` replace fields)."""
  cls, kwargs = model_kwargs(model_config)
  return cls(**{**kwargs, **overrides}, rngs=rngs)


def apply_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array, jax.Array, Any], jax.Array]:
  """`apply_fn(params, x, t, y)`: the network of `graphdef` as a pure function of its state.

  `params` is an `nnx.State` or its pure dict; merging inside a jitted function keeps the
  weights an argument rather than a constant (the NNX performance guide's split/merge).
  This is the samplers' model-function contract (`diffit_jax.diffusion.samplers`); no dropout.
  """
  return lambda params, x, t, y: nnx.merge(graphdef, params)(x, t, y)


def nnx_apply_fn(model: nnx.Module) -> tuple[Callable[[Any, jax.Array, jax.Array, Any], jax.Array], Any]:
  """`(apply_fn, state)` for a Flax NNX model called as `model(x, t, y)`.

  Splits the model once (`nnx.split`) so the state is an ordinary pytree argument of the
  compiled sampler, as the NNX performance guide recommends. Put the model in eval mode
  (`model.eval()`) first so dropout is off.
  """
  graphdef, state = nnx.split(model)
  return apply_fn(graphdef), state


def input_shape(model_config: Any, batch_size: int = 1) -> tuple[int, int, int, int]:
  """(B, H, W, C) of the network's input."""
  if model_config.name == "latent":
    return (batch_size, model_config.input_size, model_config.input_size, model_config.in_channels)
  return (batch_size, model_config.image_size, model_config.image_size, model_config.in_channels)


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param leaves; fixed embeddings are not parameters)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_flops(model_config: Any, batch_size: int = 1) -> float:
  """FLOPs of one forward pass (XLA's count: a multiply-add is 2 FLOPs).

  Built abstractly (nothing allocated) with the block scan unrolled, because XLA's
  cost analysis counts a loop body once.
  """
  overrides = {"scan_blocks": False, "remat": False} if model_config.name == "latent" else {}
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: build_model(model_config, rngs=nnx.Rngs(0), **overrides)))
  num_classes = model_config.num_classes
  x = jax.ShapeDtypeStruct(input_shape(model_config, batch_size), jnp.float32)
  t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32) if num_classes > 0 else None
  return float(jax.jit(apply_fn(graphdef)).lower(state, x, t, y).cost_analysis()["flops"])


__all__ = ["CUSTOM_VARIANT", "SIZE_FIELDS", "latent_sizes", "TMSA", "DiffiTBlock", "DiffiTResBlock", "LatentDiffiT", "ImageDiffiT", "LATENT_SIZES",
           "latent_variant", "build_model", "model_kwargs", "apply_fn", "input_shape", "count_params",
           "forward_flops"]
