"""One inference path: from an experiment config and weights to uint8 images.

The trainer's sample grids and periodic FID, `python -m diffit_jax.sample` and the notebooks
all sample through this module, so the same weights, seed and labels give the same images
everywhere:

  apply_fn / nnx_apply_fn     a network as the sampler's pure `apply_fn(params, x, t, y)`
  make_decoder                sampler output -> uint8 NHWC images (through the VAE for latent
                              models), with one rounding rule (`uint8_rounding`)
  Pipeline                    the compiled sampler of `config.sampler`
                              (`diffusion.SamplerConfig.from_config`) and the decoder:
                              `images(params, ...)`
  resolve_config, load_params, place_params, load
                              a training workdir's or a converted checkpoint's config and
                              weights, checked against the network and placed on the mesh

For example (a converted official checkpoint and VAE):

    pipe, params, _ = inference.load(checkpoint="ckpt/diffit_256", vae="ckpt/sd_vae_ema")
    images = pipe.images(params, labels=[88, 207], sample_indices=[0, 1], seed=0)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffit_jax import checkpoint, models
from diffit_jax import run as run_lib
from diffit_jax import sharding as sharding_lib
from diffit_jax.diffusion import samplers
from diffit_jax.models import apply_fn, nnx_apply_fn  # the samplers' apply_fn(params, x, t, y)
from diffit_jax.utils import to_uint8


# ----------------------------------------------------------------------------------------
# The network from shapes.


def abstract_network(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(graphdef, abstract state) of `config.model`, built from shapes (nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0))))


# ----------------------------------------------------------------------------------------
# Sampler output -> uint8 images.


def uint8_rounding(config: ml_collections.ConfigDict) -> bool:
  """Whether [-1, 1] images become uint8 by rounding (True) or truncation (False).

  Each formulation follows the code whose published numbers it reproduces, so that FID is
  comparable with them: the DiffiT release (ADM, latent models) stores
  clamp((x + 1) * 127.5, 0, 255) cast to uint8, i.e. truncation, as ADM's samplers do;
  EDM (image-space models) writes x * 127.5 + 128 clipped and cast, i.e. rounding. The
  difference is half a grey level, visible in FID's last digits only.
  """
  return config.diffusion.name == "edm"


def make_decoder(config: ml_collections.ConfigDict, vae_path: str | None,
                 sharding: jax.sharding.Sharding, *, require_vae: bool = True):
  """(decode, vae_params): a map from sampler output to uint8 NHWC images.

  Args:
    config: the experiment config (`config.model.name`, `config.diffusion.name`).
    vae_path: a converted SD VAE (`python -m diffit_jax.convert vae`) to decode latents.
    sharding: where to place the VAE's weights (replicated over the mesh).
    require_vae: a latent model without a VAE raises (True), or shows its first three
      latent channels as an image (False: the trainer's grids before a VAE is set).

  Returns:
    `decode(x) -> (B, H, W, C) uint8` (jitted; the VAE's weights are an argument, not
    constants) and the VAE's weights (None when there is no VAE).
  """
  rounding = uint8_rounding(config)
  if config.model.name != "latent" or (not vae_path and not require_vae):
    channels = 3 if config.model.name == "latent" else None
    return jax.jit(lambda x: to_uint8(x[..., :channels], rounding=rounding)), None
  if not vae_path:
    raise ValueError("latent samples need the SD VAE to become images: pass --vae=DIR (make "
                     "DIR with `python -m diffit_jax.convert vae --src=sd-vae-ft-ema --out=DIR`) "
                     "or set config.vae.")
  from diffit_jax.convert.vae import load_vae  # pylint: disable=g-import-not-at-top
  graphdef, vae_params = nnx.split(load_vae(vae_path, sharding=sharding))
  decode = vae_decoder(graphdef, rounding)
  return (lambda z: decode(vae_params, z)), vae_params


def vae_decoder(graphdef: Any, rounding: bool) -> Any:
  """The jitted `decode(vae_params, z) -> (B, H, W, 3) uint8` of an SD VAE's `graphdef`."""
  from diffit_jax.models.vae import from_latent  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda params, z: to_uint8(
      nnx.merge(graphdef, params).decode(from_latent(z)), rounding=rounding))


class Pipeline:
  """The compiled sampler of a config and its decoder: weights, labels, seed -> uint8 images.

  Args:
    config: the experiment config.
    mesh: the mesh whose batch axes split the batch (default `create_mesh(config.mesh)`).
    graphdef: the network's graph (default: built from `config.model`).
    vae: a converted SD VAE for latent models (default `config.vae`).
    require_vae: see `make_decoder`.
    num_steps: overrides `config.sampler.num_steps`.
    decoder: `(decode, vae_params)` from `make_decoder`, to share one VAE between pipelines.

  Attributes:
    config, mesh, graphdef, sampler (`diffusion.Sampler`), decode, vae_params.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
               graphdef: Any = None, vae: str | None = None, require_vae: bool = True,
               num_steps: int | None = None, decoder: tuple[Any, Any] | None = None):
    self.config = config
    self.mesh = mesh if mesh is not None else sharding_lib.create_mesh(config.mesh)
    self.graphdef = graphdef if graphdef is not None else abstract_network(config)[0]
    self.sampler = samplers.make_sampler(
        samplers.SamplerConfig.from_config(config, num_steps=num_steps), apply_fn(self.graphdef),
        models.input_shape(config.model)[1:], mesh=self.mesh)
    self._require_vae = require_vae
    self.decode, self.vae_params = decoder or make_decoder(
        config, vae if vae is not None else config.vae,
        sharding_lib.replicated(self.mesh), require_vae=require_vae)

  def with_num_steps(self, num_steps: int | None) -> "Pipeline":
    """This pipeline with another step count (the same decoder); itself for None or 0."""
    if not num_steps or num_steps == self.sampler.config.num_steps:
      return self
    return Pipeline(self.config, mesh=self.mesh, graphdef=self.graphdef, num_steps=num_steps,
                    decoder=(self.decode, self.vae_params))

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of one uint8 image."""
    x = jax.ShapeDtypeStruct((1, *self.sampler.shape), jnp.float32)
    return tuple(jax.eval_shape(self.decode, x).shape[1:])

  def images(self, params: Any, labels: Any, sample_indices: Any, seed: int, *,
             x_T: Any = None) -> jax.Array:
    """(B, H, W, C) uint8 images, batch sharded over the mesh; see `diffusion.Sampler`."""
    if labels is not None:
      labels = np.asarray(labels, np.int32) if not isinstance(labels, jax.Array) else labels
    return self.decode(self.sampler(params, labels, sample_indices, seed, x_T=x_T))


def draw_labels(how: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray | None:
  """The label of every sample, a function of (how, seed, index) only.

  Args:
    how: "random" (uniform, as the paper's evaluation), "cycle" (0, 1, ..., K-1, 0, ...) or
      comma-separated class ids repeated to num_samples.
    num_samples: how many labels.
    num_classes: K; 0 for an unconditional model (then None is returned).
    seed: the seed of "random".
  """
  if num_classes <= 0:
    if how not in ("random", "cycle"):
      raise ValueError("--labels was given but the model is unconditional (num_classes 0).")
    return None
  if how == "random":
    return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)
  if how == "cycle":
    return (np.arange(num_samples) % num_classes).astype(np.int32)
  try:
    chosen = np.array([int(v) for v in how.split(",")], np.int32)
  except ValueError:
    raise ValueError(f"--labels={how!r}: use 'random', 'cycle' or comma-separated class ids.")
  if chosen.min() < 0 or chosen.max() >= num_classes:
    raise ValueError(f"--labels must be class ids in [0, {num_classes}), got {how!r}.")
  return np.resize(chosen, num_samples)


# ----------------------------------------------------------------------------------------
# Configs and weights of a training workdir or a converted checkpoint.


def flat_dict(tree: Any) -> dict[str, Any]:
  """Leaves by "/"-joined string path (Orbax restores nnx.List indices as strings, NNX
  uses ints)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def resolve_config(config: ml_collections.ConfigDict | None, workdir: str | None,
                   checkpoint_path: str | None) -> ml_collections.ConfigDict:
  """The experiment config: given, or the one the run saved (`run.resolve_run(None,
  workdir)`: WORKDIR/config.json), or the one saved with a converted checkpoint (cheap: no
  weights are read). A saved one is read through the schema, so a field it lacks has the
  schema's default; a config read back is a copy the caller may change (say, its sampler)."""
  if bool(workdir) == bool(checkpoint_path):
    raise ValueError("pass exactly one of --workdir (a training run) or --checkpoint "
                     "(a converted weights checkpoint).")
  if config is not None:
    return config
  if workdir:
    try:
      return ml_collections.ConfigDict(run_lib.resolve_run(None, workdir).config)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None
  return checkpoint.converted_config(checkpoint_path)


def load_params(workdir: str | None, checkpoint_path: str | None) -> tuple[dict, int | None]:
  """(params, step): a training workdir's newest EMA and its step, or a converted weights
  checkpoint's parameters and None. Host arrays; `place_params` puts them on devices."""
  if not workdir:
    return checkpoint.load_weights(checkpoint_path, kind="diffit")[0], None
  step = checkpoint.latest_step(workdir)  # None: load_run_params says what is missing
  # The step is pinned so that a checkpoint finishing meanwhile cannot change it.
  return checkpoint.load_run_params(workdir, step)[0], step


def place_params(abstract_state: Any, params: dict, source: str, model_name: str,
                 sharding: jax.sharding.Sharding) -> Any:
  """Places loaded parameters into the abstract network state, checking that they fit."""
  want, have = flat_dict(nnx.to_pure_dict(abstract_state)), flat_dict(params)
  bad = sorted(k for k in want.keys() & have.keys()
               if tuple(want[k].shape) != tuple(np.shape(have[k])))
  missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  if bad or missing or unexpected:
    lines = [f"  wrong shape {k}: checkpoint {np.shape(have[k])}, config {want[k].shape}"
             for k in bad[:8]]
    lines += [f"  missing {k}" for k in missing[:8]]
    lines += [f"  unexpected {k}" for k in unexpected[:8]]
    raise ValueError(f"the weights in {source} do not match config.model ({model_name}):\n"
                     + "\n".join(lines) + "\nPass the config the weights were trained or "
                     "converted with (or, with --checkpoint, none: the saved one is used).")
  placed = {k: jax.device_put(jnp.asarray(have[k], want[k].dtype), sharding) for k in want}
  nnx.replace_by_pure_dict(abstract_state, jax.tree_util.tree_map_with_path(
      lambda path, _: placed["/".join(str(getattr(k, "key", k)) for k in path)],
      nnx.to_pure_dict(abstract_state)))
  return abstract_state


def load(*, workdir: str | None = None, checkpoint: str | None = None,
         config: ml_collections.ConfigDict | None = None, vae: str | None = None,
         mesh: Mesh | None = None, **pipeline_kwargs) -> tuple[Pipeline, Any, int | None]:
  """(pipeline, params, step) for a training workdir's newest EMA weights or a converted
  checkpoint, with the config saved with them unless `config` is given.

  Sample with `pipeline.images(params, labels, sample_indices, seed)`; `step` is the
  workdir checkpoint's (None for a converted checkpoint).
  """
  config = resolve_config(config, workdir, checkpoint)
  pipeline = Pipeline(config, mesh=mesh, vae=vae, **pipeline_kwargs)
  params, step = load_params(workdir, checkpoint)
  state = place_params(abstract_network(config)[1], params, workdir or checkpoint,
                       config.model.name, sharding_lib.replicated(pipeline.mesh))
  return pipeline, state, step
