"""The training loop: `train_and_evaluate(config, workdir)`, what `python -m diffit_jax.main` runs.

Reads top to bottom in the order a run happens:

  1. distributed   `jax.distributed.initialize` when the run spans several processes
                   (`diffit_jax.sharding.initialize_distributed`).
  2. mesh          one ("data", "fsdp") mesh from `config.mesh` (`diffit_jax.sharding`).
  3. data          this process's shard of the grain pipeline (`diffit_jax.data`).
  4. model + opt   the network split once (`nnx.split`) into a graph and a pure dict of
                   float32 weights; Adam/AdamW with warm-up and clipping (`diffit_jax.optim`).
  5. shardings     the train state's layout: replicated, or FSDP by config.
  6. restore       once the workdir is locked for this run (`checkpoint.lock_for_run`: a
                   second trainer on it is refused at start, naming the first), the
                   newest intact checkpoint in WORKDIR, if any (exact resume); broken
                   newer ones are skipped and set aside (`diffit_jax.checkpoint`). A fresh
                   run may start from other weights (`config.init_from`, `diffit_jax.finetune`).
  7. step          one pure `(state, batch) -> (state, metrics)` function, `jax.jit`-ed and
                   compiled once, ahead of the loop, with explicit shardings and the state
                   donated; "jit" lets XLA partition the step, "shard_map" writes the
                   data-parallel gradient all-reduce by hand.
  8. loop          logging, the NaN guard, checkpoints (only of finite states), EMA
                   sample grids, SIGTERM, FID.

The train state (`TrainState`) holds the step, the run's base PRNG key, the float32
weights, their EMA and the optimizer state. Step k's randomness is
`fold_in(key, k)`: the noise levels, noise, label dropout for classifier-free guidance
(labels replaced by the null class `num_classes` with probability
`config.diffusion.class_dropout_prob`) and the network's dropout. Those draws are made
for the whole global batch before the gradient computation, so the jit and shard_map
steps see identical noise whatever the mesh (threefry is partitionable).

Losses follow `config.diffusion.name`: "edm" (image-space DiffiT, EDM's preconditioned
denoising loss) or "adm" (latent DiffiT, IDDPM's hybrid L_simple + L_vlb loss on
pre-encoded latents). Mixed precision is `config.model.dtype = "bfloat16"`: the network
computes in bfloat16 while weights, gradients, EMA and Adam moments stay float32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import config_lib
from diffit_jax import diffusion
from diffit_jax import files
from diffit_jax import finetune
from diffit_jax import inference
from diffit_jax import logging_utils
from diffit_jax import models
from diffit_jax import optim
from diffit_jax import sharding as sharding_lib
from diffit_jax.config_lib import ConfigError

STEP_IMPLS = ("jit", "shard_map")
SAMPLES_DIR = "samples"


class TrainState(NamedTuple):
  """Everything a step changes or needs; a pytree, checkpointed whole."""
  step: jax.Array        # () int32: optimizer steps taken
  rng: jax.Array         # (2,) uint32: key data of the run's base key (constant)
  params: Any            # pure dict of float32 weights (`nnx.to_pure_dict` layout)
  ema_params: Any        # same structure: the weights sampling uses
  opt_state: Any         # optax state over `params` (float32 moments)


class NonFiniteLossError(FloatingPointError):
  """The loss or the state became NaN or Inf; the message names the steps and the last good
  checkpoint."""


# ----------------------------------------------------------------------------------------
# Config validation, fitting the config to the data.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming a bad training setting and the fix.

  Checks the fields against the schema (`config_lib.check_config`), then every name and
  value the run will use; nothing is built, read or written. `train_and_evaluate` runs it
  with the checks that need the devices or the data, before it writes anything.
  """
  config_lib.check_config(config)
  left = config_lib.left_to_data(config)
  if left:
    raise ConfigError(
        f"{', '.join(left)} leave these fields to the dataset, but they were not filled from "
        "it: training fills them when it starts (python -m diffit_jax.main); to sample, pass "
        "the run's --workdir, whose config.json holds them, or set them.")
  name = config.diffusion.name
  if name not in ("edm", "adm"):
    raise ConfigError(f"config.diffusion.name={name!r}; use 'edm' (image space) or 'adm' "
                      "(latent).")
  if config.step_impl not in STEP_IMPLS:
    raise ConfigError(f"config.step_impl={config.step_impl!r}; use one of {STEP_IMPLS}.")
  p = float(config.diffusion.class_dropout_prob)
  if not 0.0 <= p < 1.0:
    raise ConfigError(f"config.diffusion.class_dropout_prob={p} must be in [0, 1).")
  scale = float(config.sampler.guidance.scale)
  conditional_only = [f"{field}={off} (it is {value})" for field, value, off in (
      ("config.diffusion.class_dropout_prob", p, 0), ("config.sampler.guidance.scale", scale, 1))
                      if value != off]
  if not config.model.num_classes and conditional_only:
    raise ConfigError(
        "An unconditional model (config.model.num_classes=0) has no class labels to drop or "
        f"to guide with: set {' and '.join(conditional_only)}, or config.model.num_classes to "
        "the number of classes for a class-conditional model.")
  learn_sigma = config.model.name == "latent" and config.model.learn_sigma
  if name == "adm" and bool(learn_sigma) != bool(config.diffusion.learn_sigma):
    raise ConfigError("config.model.learn_sigma and config.diffusion.learn_sigma must agree (the "
                      "learned-variance channels are what the hybrid loss trains).")
  for key in ("num_train_steps", "batch_size", "log_every_steps"):
    if int(config[key]) <= 0:
      raise ConfigError(f"config.{key}={config[key]} must be a positive integer.")
  keep = config.keep_checkpoints
  if keep is not None and int(keep) <= 0:
    raise ConfigError(f"config.keep_checkpoints={keep} would keep no checkpoint: the run could "
                      "neither resume nor be sampled from. Set it to a positive number (e.g. 3).")
  optim.validate_ema_config(config.ema)
  optim.validate_optimizer_config(config.optimizer)
  for group, check in (
      ("model", lambda: models.model_kwargs(config.model)),
      ("sampler", lambda: diffusion.samplers.validate(
          diffusion.SamplerConfig.from_config(config), models.input_shape(config.model)[1:]))):
    try:
      check()
    except ValueError as e:
      raise ConfigError(f"config.{group}: {e}") from e
  if config.eval.every_steps and not (config.eval.inception and config.eval.reference):
    raise ConfigError("config.eval.every_steps > 0 needs config.eval.inception and "
                      "config.eval.reference (see python -m diffit_jax.evaluate), or set it to 0.")


def fit_to_data(config: ml_collections.ConfigDict) -> Any:
  """Fills the fields `config` leaves to the dataset; refuses data the model cannot take.

  Reads the dataset's description only (a built dataset's `dataset_info.json`, the first
  latent record); nothing is written or compiled. The fields holding their
  `config_lib.FROM_DATA` value are set from it (`config_lib.fill_from_data`), then the run is
  refused, with the fields to set, when:
    * the stored images share one size other than `config.data.image_size` (they would be
      silently up- or downscaled), unless `config.data.allow_resize`;
    * the network's input differs from what `config.data` yields;
    * a class-conditional model meets data without labels, or more classes than it has.

  Returns:
    The `data.DatasetInfo` of `config.data`.

  Raises:
    ConfigError: as above, or `config.data` names data that cannot be read.
    FileNotFoundError: no dataset where `config.data.name` points.
  """
  config_lib.check_config(config)
  # Imported here: the train step itself needs no input pipeline (see train_and_evaluate).
  from diffit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    info = data_lib.get_dataset_info(config.data)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e
  filled = config_lib.fill_from_data(config, info.example_shape, info.num_classes)
  if filled:
    logging.info("From the dataset %s: %s.", config.data.name, ", ".join(filled))
  data, model = config.data, config.model
  if info.stored_shape is not None and not data.allow_resize:
    (h, w, _), size = info.stored_shape, info.example_shape[0]
    if (h, w) != (size, size):
      how = "upscale" if size > min(h, w) else "center-crop and downscale"
      fix = (f"set config.data.image_size={h} and config.model.image_size={h} (0 in both "
             "takes the dataset's, as configs/custom_folder.py does)" if h == w else
             "rebuild it square (python -m diffit_jax.data build --resolution=N)")
      raise ConfigError(
          f"{data.name} holds {h}x{w} images, but config.data.image_size={size} would {how} "
          f"them: {fix}, or set config.data.allow_resize=True to resize them.")
  want, have = tuple(models.input_shape(model)[1:]), tuple(info.example_shape)
  if want != have:
    side = "input_size" if model.name == "latent" else "image_size"
    fix = " and ".join(f"config.model.{k}={v}" for k, v, old in (
        (side, have[0], want[0]), ("in_channels", have[2], want[2])) if v != old)
    raise ConfigError(
        f"The model takes {'x'.join(map(str, want))} inputs, but {data.name} yields "
        f"{'x'.join(map(str, have))} examples (H x W x C): set {fix}.")
  num_classes = int(model.num_classes)
  if num_classes and not info.num_classes:
    raise ConfigError(
        f"config.model.num_classes={num_classes} makes a class-conditional model, but "
        f"{data.name} has no class labels: for an unconditional model set "
        "config.model.num_classes=0, config.diffusion.class_dropout_prob=0 and "
        "config.sampler.guidance.scale=1.")
  if info.num_classes > num_classes > 0:
    raise ConfigError(f"{data.name} has {info.num_classes} classes, more than "
                      f"config.model.num_classes={num_classes}: set config.model.num_classes="
                      f"{info.num_classes}.")
  return info


# ----------------------------------------------------------------------------------------
# 4-5. Model, optimizer and the initial train state.


class Setup(NamedTuple):
  """What `create_train_state` builds besides the state itself."""
  graphdef: Any          # nnx.GraphDef of the network
  tx: optax.GradientTransformation
  shardings: TrainState  # NamedSharding per leaf of the state
  abstract_state: TrainState  # ShapeDtypeStructs with those shardings


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, *,
                       initialize: bool = True) -> tuple[Setup, TrainState | None]:
  """Builds the network, optimizer and (optionally) a freshly initialised, sharded state.

  The weights are created inside `jax.jit` with the state's out_shardings, so a large
  model is never materialised whole on one device. `initialize=False` only builds the
  abstract state (the run is about to restore a checkpoint).
  """
  tx = optim.create_optimizer(config.optimizer)

  def init() -> TrainState:
    model = models.build_model(config.model, rngs=nnx.Rngs(params=config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    key = jax.random.key_data(jax.random.key(config.seed + 1))
    return TrainState(step=jnp.zeros((), jnp.int32), rng=key, params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

  abstract_model = nnx.eval_shape(lambda: models.build_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError("The trainer updates nnx.Param state only, but this network also "
                              f"holds {jax.tree.structure(rest)}.")
  abstract = jax.eval_shape(init)
  shardings = sharding_lib.state_shardings(abstract, mesh, config.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  state = None
  if initialize:
    # Init runs once: on CPU, LLVM's optimisations would cost ~6x the compile time of
    # the hundreds of small RNG kernels for nothing.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state = jax.jit(init, out_shardings=shardings, compiler_options=options)()
  return Setup(graphdef, tx, shardings, abstract), state


# ----------------------------------------------------------------------------------------
# 7. The train step.


def make_loss_fn(config: ml_collections.ConfigDict, graphdef: Any) -> Callable:
  """`loss_fn(params, x0, y, noise, level, dropout_rng) -> (loss, metrics)` for one (sub)batch.

  The batch mean of `diffusion.from_config(config).loss` at noise levels `level` (EDM's
  sigma or ADM's step index), for the pure-dict weights `params` the step differentiates.
  """
  process = diffusion.from_config(config)

  @jax.named_scope("diffusion_loss")
  def loss_fn(params, x0, y, noise, level, dropout_rng):
    model = nnx.merge(graphdef, params)
    net = lambda x, t, labels: model(x, t, labels, rng=dropout_rng)
    per_example, aux = process.loss(net, x0, y, t=level, noise=noise)
    metrics = {k: aux[k].mean() for k in ("mse", "vb") if k in aux}
    loss = per_example.mean()
    return loss, {"loss": loss, **metrics}

  return loss_fn


def draw_step_randomness(config: ml_collections.ConfigDict, rng: jax.Array,
                         batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, Any]:
  """(noise, noise level, labels after label dropout) for the whole global batch."""
  x0 = batch["image"]
  b = x0.shape[0]
  noise_rng, level_rng, label_rng = jax.random.split(rng, 3)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)  # (B, H, W, C)
  level = diffusion.from_config(config).sample_t(level_rng, b)  # (B,) sigma or step index
  num_classes = int(config.model.num_classes)
  if not num_classes:
    return noise, level, None
  labels = batch["label"].astype(jnp.int32)  # (B,)
  p = float(config.diffusion.class_dropout_prob)
  if p > 0:  # classifier-free guidance training: the null class is id num_classes
    labels = jnp.where(jax.random.bernoulli(label_rng, p, (b,)), num_classes, labels)
  return noise, level, labels


def make_train_step(config: ml_collections.ConfigDict, setup: Setup, mesh: Mesh
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

  `config.step_impl`:
    "jit"        XLA partitions the global-batch step over the mesh (data parallel or
                 FSDP, following the state's shardings).
    "shard_map"  the data-parallel step written per device: local loss and gradients,
                 then an explicit `pmean` all-reduce over ("data", "fsdp"). The gradients
                 are taken with `check_vma=False`, so they are the local ones and the pmean
                 averages them once (with vma checking, JAX would already have summed them
                 for the replicated weights, and the pmean would return N times the true
                 gradient). Network dropout masks are drawn per device, so with
                 dropout > 0 the two are equal in distribution rather than bitwise.
  """
  loss_fn = make_loss_fn(config, setup.graphdef)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  lr_schedule = optim.learning_rate_schedule(config.optimizer)
  impl = config.step_impl
  axes = sharding_lib.BATCH_AXES

  def local_grads(params, x0, y, noise, level, dropout_rng):
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axes))
    (_, metrics), grads = grad_fn(params, x0, y, noise, level, dropout_rng)
    return jax.lax.pmean(grads, axes), jax.lax.pmean(metrics, axes)  # the all-reduce

  sharded_grads = jax.shard_map(
      local_grads, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes), P(axes), P()),
      out_specs=(P(), P()), check_vma=False)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    draw_rng, dropout_rng = jax.random.split(rng)
    noise, level, y = draw_step_randomness(config, draw_rng, batch)
    if impl == "shard_map":
      grads, metrics = sharded_grads(state.params, batch["image"], y, noise, level, dropout_rng)
    else:
      (_, metrics), grads = grad_fn(state.params, batch["image"], y, noise, level, dropout_rng)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = optim.ema_decay(state.step, config.ema, config.batch_size)
    ema_params = optim.update_ema(state.ema_params, params, decay)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "learning_rate": lr_schedule(state.step), "ema_decay": decay}
    new_state = TrainState(step=state.step + 1, rng=state.rng, params=params,
                           ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(train_step,
                 in_shardings=(setup.shardings, {"image": batch_sharding, "label": batch_sharding}),
                 out_shardings=(setup.shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)


# ----------------------------------------------------------------------------------------
# 8. Loop helpers: samples, FID, NaN guard, SIGTERM.


class SampleWriter:
  """EMA sample grids: `WORKDIR/samples/step_XXXXXX.png`, one row per class.

  Class-conditional models show `config.sample_grid.classes` (default the first
  min(num_classes, 10)) with `per_class` samples each; unconditional ones `num_images`.
  Latent models are decoded with the VAE at `config.vae` when it is set; otherwise the
  first three latent channels are shown. The same seed every time, so grids from
  successive steps are comparable. `config.sample_grid.num_steps` (0: config.sampler's)
  makes the grids cheaper than the samples `python -m diffit_jax.sample` draws.
  """

  def __init__(self, config: ml_collections.ConfigDict, pipeline: inference.Pipeline,
               workdir: str):
    grid = config.sample_grid
    num_classes = int(config.model.num_classes)
    if num_classes:
      classes = list(grid.classes or range(min(num_classes, 10)))
      self.labels = np.repeat(np.asarray(classes, np.int32), int(grid.per_class))
      self.num, self.rows = len(self.labels), len(classes)
    else:
      self.labels, self.num = None, int(grid.num_images)
      self.rows = max(1, int(math.sqrt(self.num)))
    self.seed = int(grid.seed)
    self.scale = int(grid.scale)
    self.pipeline = pipeline.with_num_steps(int(grid.num_steps))
    self.folder = os.path.join(workdir, SAMPLES_DIR)

  def __call__(self, ema_params: Any, step: int) -> str:
    """Samples the grid for `step` and writes it (process 0); returns the PNG path."""
    start = time.perf_counter()
    x = sharding_lib.to_host(self.pipeline.images(ema_params, self.labels, np.arange(self.num),
                                                  self.seed))
    path = os.path.join(self.folder, f"step_{step:06d}.png")
    if jax.process_index() == 0:
      logging_utils.save_image_grid(path, x, self.rows, scale=self.scale)
    logging.info("Sample grid for step %d (%d images, %d NFE) in %.1f s.", step, self.num,
                 self.pipeline.sampler.nfe, time.perf_counter() - start)
    return path


FID_SEED = 1_000_003  # the periodic FID at step s samples with seed FID_SEED + s


def evaluate_fid(config: ml_collections.ConfigDict, pipeline: inference.Pipeline,
                 ema_params: Any, step: int, evaluator: Any) -> dict[str, float]:
  """FID etc. of `config.eval.num_samples` EMA samples (uniform random classes).

  The images are exactly those of `python -m diffit_jax.sample --workdir=WORKDIR
  --num_samples=N --labels=random --seed=FID_SEED+step` from the same weights.
  """
  n, batch = int(config.eval.num_samples), int(config.eval.batch_size)
  seed = FID_SEED + step
  labels = inference.draw_labels("random", n, int(config.model.num_classes), seed)

  def batches():
    for start in range(0, n, batch):
      idx = np.arange(start, min(start + batch, n))
      x = sharding_lib.to_host(pipeline.images(
          ema_params, None if labels is None else labels[idx], idx, seed))
      yield np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]

  scores = evaluator(batches(), total=n, precision_recall=False)
  return {f"eval/{k}": float(v) for k, v in scores.items() if v is not None}


class Preemption:
  """Notices SIGTERM (a preempted VM) so that the loop checkpoints and exits cleanly.

  One process: a Python signal handler sets a flag. Several processes: JAX's preemption
  sync manager (started by `jax.distributed.initialize`) propagates the notice and picks
  a step at which every process stops together (`reached_preemption_sync_point`).
  """

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting.")
    self.received = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _non_finite_advice(last_good: int | None, ckpt_dir: str) -> str:
  """Where a rerun starts after NonFiniteLossError, and what to change."""
  where = (f"The newest good checkpoint is step {last_good} in {ckpt_dir}; a rerun resumes "
           "from it" if last_good is not None else
           "No good checkpoint was saved yet; a rerun starts from scratch")
  return (f"{where}. Lower the learning rate, enable gradient clipping "
          "(config.optimizer.grad_clip_norm) or warm-up (config.optimizer.warmup_steps).")


def _check_finite(pending: list[tuple[int, dict]], last_good: int | None, ckpt_dir: str) -> None:
  """Raises NonFiniteLossError if a loss or gradient norm in `pending` is NaN/Inf.

  A finite loss with a non-finite gradient would still poison the weights, so both are
  checked; this runs on the host every log interval and before every checkpoint.
  """
  if not pending:
    return
  steps = [s for s, _ in pending]
  values = np.array(jax.device_get([(m["loss"], m["grad_norm"]) for _, m in pending]),
                    np.float64)  # (num_steps, 2)
  bad = ~np.isfinite(values).all(axis=1)
  if not bad.any():
    return
  first = steps[int(np.argmax(bad))]
  raise NonFiniteLossError(
      f"The training loss or gradient became NaN/Inf between steps {steps[0]} and {steps[-1]} "
      f"(first at step {first}); stopping without saving. "
      + _non_finite_advice(last_good, ckpt_dir))


def make_state_check(setup: Setup, mesh: Mesh) -> Callable[[TrainState], bool]:
  """`is_finite(state)`: whether every weight, EMA weight and optimizer moment is finite.

  A loss can still be finite at the step whose update overflowed the weights, so the
  state itself is checked before each save. One jitted reduction on the devices (XLA
  fuses each leaf's isfinite-all into one pass over the state, ~4 reads per parameter)
  and one bool to the host: cheap next to the checkpoint it guards.
  """
  def all_finite(state: TrainState) -> jax.Array:
    trees = (state.params, state.ema_params, state.opt_state)
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))

  fn = jax.jit(all_finite, in_shardings=(setup.shardings,),
               out_shardings=sharding_lib.replicated(mesh))
  return lambda state: bool(fn(state))


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """The average of each metric over the steps in `pending`."""
  host = jax.device_get([m for _, m in pending])
  return {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json; warns about fields that differ from the previous run's.

  A previous config.json that does not parse is moved aside (kept, not overwritten) with one
  warning: this run's config, and each checkpoint's own copy, say what the run is.
  """
  path = os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
  new = _config_json(config)
  try:
    old = _config_json(checkpoint_lib.read_run_config(workdir))
  except FileNotFoundError:
    old = None
  except files.DamagedFileError as e:
    old = None
    logging.warning("%s; moved it to %s and wrote this run's config in its place.", e.problem,
                    files.move_aside(path))
  except config_lib.ConfigError as e:  # written by a diffit_jax with other fields
    old = None
    logging.warning("%s; writing this run's config in its place.", e)
  if old is not None:
    flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (
        flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
    changed = sorted(k for k in set(flat(old)) | set(flat(new)) if flat(old).get(k) != flat(new).get(k))
    if changed:
      logging.warning("Config differs from the previous run in this workdir: %s", changed)
  files.write_json(path, new)


# ----------------------------------------------------------------------------------------
# The trainer.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overrides: Iterable[str] = ()) -> TrainState:
  """Trains (or resumes) the run `config` describes in `workdir`; returns the final state.

  Running it again with the same workdir resumes from the newest intact checkpoint.

  Args:
    config: the run's config.
    workdir: the run's folder.
    overrides: the config fields the user set explicitly (`config.model.depth`, ...):
      those keep the config's values where `config.init_from`'s network would set them
      (`finetune.adopt_architecture`). The CLI passes those of its command line; a caller
      in Python gets exactly the config it passes (none by default).

  Raises:
    NonFiniteLossError: the loss or the state became NaN/Inf (the newest good checkpoint
      is kept).
    checkpoint.CorruptCheckpointError: the workdir has checkpoints but none is intact.
  """
  # 1-3. Distributed initialisation, then everything checked before anything is written:
  #      the data against the config (filling what it leaves to the data), the config, the
  #      mesh against the devices. ---------------------------------------------------------
  sharding_lib.initialize_distributed(config)
  finetune.adopt_architecture(config, workdir, overrides)  # init_from's network, unless set
  fit_to_data(config)  # the fields left to the dataset; data the model cannot take
  validate_config(config)
  # Imported here: the train step itself needs no input pipeline (grain, tfds), so tools
  # that only build and time it (experiments/accelerator_check.py) run without them.
  from diffit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  batch_size = int(config.batch_size)
  try:
    mesh = sharding_lib.create_mesh(config.mesh)
    if batch_size % mesh.size:
      raise ConfigError(f"config.batch_size={batch_size} must be a multiple of the {mesh.size} "
                        "devices the batch is split over.")
    # This process's shard of the data, checkpointable.
    data_iter = data_lib.create_train_iterator(config.data, global_batch_size=batch_size,
                                               seed=config.seed)
  except ValueError as e:  # config.mesh or config.data does not fit the devices or the data
    raise ConfigError(str(e)) from e
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
               jax.process_count())

  # Fine-tuning: the weights config.init_from names, read and fitted to this network before
  # anything is written or compiled (None: from scratch, or resuming this workdir's own).
  source = finetune.load_source(config, workdir)

  # One writer per workdir: a second run on it is refused here, before it writes anything.
  workdir = os.path.abspath(workdir)
  with checkpoint_lib.lock_for_run(workdir, what="training run",
                                   advice="pass another --workdir"):
    return _train(config, workdir, mesh, data_iter, source)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, data_iter: Any,
           source: finetune.Source | None) -> TrainState:
  """`train_and_evaluate` once the run is checked and its workdir is locked: steps 4-8."""
  batch_size = int(config.batch_size)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  image_shape = models.input_shape(config.model, batch_size)  # (B, H, W, C) the network takes

  def next_batch() -> dict[str, jax.Array]:
    local = next(data_iter)
    if tuple(local["image"].shape[1:]) != image_shape[1:]:
      raise ValueError(f"config.data yields images of shape {local['image'].shape[1:]} but "
                       f"config.model takes {image_shape[1:]}; make config.data.image_size/"
                       "channels and the model's size/in_channels agree.")
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
            for k in ("image", "label")}

  # The workdir's config.json. -----------------------------------------------------------
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    _save_config(config, workdir)
  writer = logging_utils.MetricWriter(workdir, enabled=is_chief)

  # 4-6. Model + optimizer, shardings, then restore or initialise. -----------------------
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, max_to_keep=config.keep_checkpoints)
  setup, state = create_train_state(config, mesh, initialize=ckpt.latest_step() is None)
  if state is not None and source is not None:
    state = finetune.start_from(source, state, setup.shardings)
  is_finite = make_state_check(setup, mesh)
  latest = None
  if state is None:
    latest, restored = ckpt.restore_latest(
        setup.abstract_state._asdict(), data_iterator=data_iter,
        check=lambda s: None if is_finite(TrainState(**s)) else
        "its weights, EMA or optimizer state hold NaN/Inf")
    state = TrainState(**restored)
    logging.info("Resuming from %s/%d.", ckpt.directory, latest)
  # Rows after the restored step (all rows, on a fresh start) were logged by a run that
  # stopped before a checkpoint kept them; this run logs those steps again.
  writer.rewind(latest or 0)
  num_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("%s: %.2f M parameters.", config.model.name, num_params / 1e6)

  # 7. The step, compiled once, ahead of time: processes then start stepping together
  #    (a CPU collective gives up after 30 s of waiting for a slower compile). -----------
  start = time.perf_counter()
  batch_spec = {"image": jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=batch_sharding),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}
  train_step = make_train_step(config, setup, mesh).lower(setup.abstract_state, batch_spec).compile()
  logging.info("Compiled the train step in %.1f s.", time.perf_counter() - start)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes("diffit_jax:train_step_compiled")

  # 8. The loop. -------------------------------------------------------------------------
  total = int(config.num_train_steps)
  log_every = int(config.log_every_steps)
  ckpt_every = int(config.checkpoint_every_steps)
  sample_every = int(config.sample_every_steps)
  eval_every = int(config.eval.every_steps)
  pipeline = samples = None
  if sample_every or eval_every:
    # One sampler and decoder with the mesh's batch axes; the FID uses config.sampler, so
    # its images are what `python -m diffit_jax.sample` draws from these weights.
    pipeline = inference.Pipeline(config, mesh=mesh, graphdef=setup.graphdef, require_vae=False)
    samples = SampleWriter(config, pipeline, workdir)
  evaluator = None
  if eval_every:
    from diffit_jax import evaluation  # pylint: disable=g-import-not-at-top
    evaluator = evaluation.Evaluator(config.eval.inception, config.eval.reference,
                                     cache_path=os.path.join(workdir, "fid_reference.npz"),
                                     progress=False)
  config_dict = _config_json(config)
  step = int(jax.device_get(state.step))
  last_good = latest
  pending: list[tuple[int, dict]] = []  # (step, metrics on device) since the last log
  progress = logging_utils.Progress(total, batch_size, start_step=step)
  preemption = Preemption()

  def save_checkpoint() -> None:
    nonlocal last_good
    _check_finite(pending, last_good, ckpt.directory)  # never save poisoned weights
    if not is_finite(state):
      raise NonFiniteLossError(
          f"The weights, EMA or optimizer state hold NaN/Inf at step {step} (the losses checked "
          "so far were finite); stopping without saving. "
          + _non_finite_advice(last_good, ckpt.directory))
    ckpt.save(step, state._asdict(), data_iterator=data_iter, config=config_dict)
    last_good = step

  logging.info("Training steps %d -> %d, batch %d.", step, total, batch_size)
  try:
    while step < total:
      batch = next_batch()
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      if len(pending) > 1:
        # At most one step queued ahead of the device: bounded memory, and SIGTERM or a
        # NaN is acted on within a step instead of after a long dispatch queue drains.
        jax.block_until_ready(pending[-2][1])

      if step % log_every == 0 or step == total:
        _check_finite(pending, last_good, ckpt.directory)
        scalars = _mean_metrics(pending)
        pending.clear()
        rates = progress.update(step)
        writer.write_scalars(step, {**scalars, "train/steps_per_sec": rates["steps_per_sec"],
                                    "train/images_per_sec": rates["images_per_sec"]})
        logging.info("%s", logging_utils.format_progress(step, total, scalars, rates))

      preempted = preemption.reached(step)
      if preempted or step == total or (ckpt_every and step % ckpt_every == 0):
        save_checkpoint()
        if preempted:
          logging.warning("Saved checkpoint %d after SIGTERM; exiting.", step)
          break
      if samples is not None and sample_every and (step % sample_every == 0 or step == total):
        writer.write_png(step, "samples/ema", samples(state.ema_params, step))
        progress.reset_clock(step)
      if evaluator is not None and (step % eval_every == 0 or step == total):
        scores = evaluate_fid(config, pipeline, state.ema_params, step, evaluator)
        writer.write_scalars(step, scores)
        logging.info("step %d: %s", step, scores)
        progress.reset_clock(step)
  finally:
    preemption.close()
    ckpt.close()
    writer.close()
  return state
