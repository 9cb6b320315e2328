"""The trainer: `train_and_evaluate(config, workdir)`, what `python -m diffit_jax.main` runs.

Reads top to bottom in the order a run happens:

  1. run           `jax.distributed.initialize` when the run spans several processes
                   (`sharding.initialize_distributed`), then the run resolved and checked
                   before anything is written (`run.resolve_run`: the config, filled from
                   the dataset; the fine-tuning source's weights, `config.init_from`).
  2. mesh          one ("data", "fsdp") mesh from `config.mesh` (`diffit_jax.sharding`).
  3. data          this process's shard of the grain pipeline (`diffit_jax.data`).
  4. model + opt   the network split once (`nnx.split`) into a graph and a pure dict of
                   float32 weights; Adam/AdamW with warm-up and clipping (`diffit_jax.optim`).
  5. shardings     the train state's layout: replicated, or FSDP by config.
  6. restore       once the workdir is locked for this run (`checkpoint.lock_for_run`: a
                   second trainer on it is refused at start, naming the first), the
                   newest intact checkpoint in WORKDIR, if any (exact resume); broken
                   newer ones are skipped and set aside (`diffit_jax.checkpoint`). A fresh
                   run may start from the source's weights (`finetune.start_from`).
  7. step          one pure `(state, batch) -> (state, metrics)` function, `jax.jit`-ed and
                   compiled once, ahead of the loop, with explicit shardings and the state
                   donated; "jit" lets XLA partition the step, "shard_map" writes the
                   data-parallel gradient all-reduce by hand.
  8. loop          logging, the NaN guard and SIGTERM (`diffit_jax.guards`), checkpoints
                   (only of finite states), EMA sample grids and FID (`diffit_jax.ema_samples`).

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
import os
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
from jax.sharding import Mesh, PartitionSpec as P

from diffit_jax import checkpoint as checkpoint_lib
from diffit_jax import diffusion, ema_samples, finetune, guards, inference, logging_utils, models
from diffit_jax import optim
from diffit_jax import run as run_lib
from diffit_jax import sharding as sharding_lib
from diffit_jax.config_lib import ConfigError
from diffit_jax.guards import NonFiniteLossError  # what train_and_evaluate raises on NaN/Inf


class TrainState(NamedTuple):
  """Everything a step changes or needs; a pytree, checkpointed whole."""
  step: jax.Array        # () int32: optimizer steps taken
  rng: jax.Array         # (2,) uint32: key data of the run's base key (constant)
  params: Any            # pure dict of float32 weights (`nnx.to_pure_dict` layout)
  ema_params: Any        # same structure: the weights sampling uses
  opt_state: Any         # optax state over `params` (float32 moments)


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


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """The average of each metric over the steps in `pending`."""
  host = jax.device_get([m for _, m in pending])
  return {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}


# ----------------------------------------------------------------------------------------
# The trainer.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overrides: Iterable[str] = ()) -> TrainState:
  """Trains (or resumes) the run `config` describes in `workdir`; returns the final state.

  Running it again with the same workdir resumes from the newest intact checkpoint.

  Args:
    config: the run's config (not changed: `run.resolve_run` checks and fills a copy).
    workdir: the run's folder.
    overrides: the config fields the user set explicitly (`config.model.depth`, ...):
      those keep the config's values where `config.init_from`'s network would set them
      (`run.resolve_run`). The CLI passes those of its command line; a caller in Python
      gets exactly the config it passes (none by default).

  Raises:
    ConfigError: the run cannot start (nothing is written), naming the field and the fix.
    NonFiniteLossError: the loss or the state became NaN/Inf (the newest good checkpoint
      is kept).
    checkpoint.CorruptCheckpointError: the workdir has checkpoints but none is intact.
  """
  # 1. The run, checked before anything is written: the config, filled from the data; the
  #    fine-tuning source's weights, fitted to the network. ------------------------------
  sharding_lib.initialize_distributed(config)
  run = run_lib.resolve_run(config, workdir, overrides)
  config = run.config
  # Imported here: the train step itself needs no input pipeline (grain, tfds), so tools
  # that only build and time it (experiments/accelerator_check.py) run without them.
  from diffit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  batch_size = int(config.batch_size)
  try:
    # 2. The mesh, against the devices. -------------------------------------------------
    mesh = sharding_lib.create_mesh(config.mesh)
    if batch_size % mesh.size:
      raise ConfigError(f"config.batch_size={batch_size} must be a multiple of the {mesh.size} "
                        "devices the batch is split over.")
    # 3. This process's shard of the data, checkpointable. -------------------------------
    data_iter = data_lib.create_train_iterator(config.data, global_batch_size=batch_size,
                                               seed=config.seed)
  except ValueError as e:  # config.mesh or config.data does not fit the devices or the data
    raise ConfigError(str(e)) from e
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
               jax.process_count())

  # One writer per workdir: a second run on it is refused here, before it writes anything.
  workdir = os.path.abspath(workdir)
  with checkpoint_lib.lock_for_run(workdir, what="training run",
                                   advice="pass another --workdir"):
    return _train(run, workdir, mesh, data_iter)


def _restore_or_init(run: run_lib.Run, mesh: Mesh, ckpt: checkpoint_lib.TrainCheckpointer,
                     data_iter: Any) -> tuple[Setup, TrainState, int | None, Callable]:
  """(setup, state, restored step, `is_finite`): the workdir's newest intact checkpoint
  (the data iterator restored with it), or a fresh state (from the fine-tuning source's
  weights if there is one; the restored step is then None)."""
  setup, state = create_train_state(run.config, mesh, initialize=ckpt.latest_step() is None)
  if state is not None and run.source is not None:
    state = finetune.start_from(run.source, state, setup.shardings)
  is_finite = guards.make_state_check(setup.shardings, mesh)
  latest = None
  if state is None:
    latest, restored = ckpt.restore_latest(
        setup.abstract_state._asdict(), data_iterator=data_iter,
        check=lambda s: None if is_finite(TrainState(**s)) else
        "its weights, EMA or optimizer state hold NaN/Inf")
    state = TrainState(**restored)
    logging.info("Resuming from %s/%d.", ckpt.directory, latest)
  return setup, state, latest, is_finite


def _train(run: run_lib.Run, workdir: str, mesh: Mesh, data_iter: Any) -> TrainState:
  """`train_and_evaluate` once the run is checked and its workdir is locked: steps 4-8."""
  config = run.config
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
    run_lib.write_config(config, workdir)
  writer = logging_utils.MetricWriter(workdir, enabled=is_chief)

  # 4-6. Model + optimizer, shardings, then restore or initialise. -----------------------
  ckpt = checkpoint_lib.TrainCheckpointer(workdir, max_to_keep=config.keep_checkpoints)
  setup, state, latest, is_finite = _restore_or_init(run, mesh, ckpt, data_iter)
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
    samples = ema_samples.SampleWriter(config, pipeline, workdir)
  evaluator = ema_samples.fid_evaluator(config, workdir)
  config_dict = json.loads(config.to_json())
  step = int(jax.device_get(state.step))
  last_good = latest
  pending: list[tuple[int, dict]] = []  # (step, metrics on device) since the last log
  progress = logging_utils.Progress(total, batch_size, start_step=step)
  preemption = guards.Preemption()

  def save_checkpoint() -> None:
    nonlocal last_good
    guards.check_losses(pending, last_good, ckpt.directory)  # never save poisoned weights
    if not is_finite(state):
      raise NonFiniteLossError(
          f"The weights, EMA or optimizer state hold NaN/Inf at step {step} (the losses checked "
          "so far were finite); stopping without saving. "
          + guards.non_finite_advice(last_good, ckpt.directory))
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
        guards.check_losses(pending, last_good, ckpt.directory)
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
        scores = ema_samples.evaluate_fid(config, pipeline, state.ema_params, step, evaluator)
        writer.write_scalars(step, scores)
        logging.info("step %d: %s", step, scores)
        progress.reset_clock(step)
  finally:
    preemption.close()
    ckpt.close()
    writer.close()
  return state
