"""What a compiled program needs per device: the compiler's memory plan and cost analysis.

Every program diffit_jax compiles is lowered here from shapes alone (nothing allocated, no
weights read): the train step of a config over its mesh, the guided sampler at a batch
size, the VAE's decoder and encoder, and the FID Inception. Compiled for the devices
present, or for a TPU slice that is not (`diffit_jax.tpu`), each gives a `Plan`: the
compiler's per-device memory (arguments, temporaries, outputs), its FLOPs and bytes
accessed, and, for a TPU chip, a roofline lower bound of the step time. `python -m
diffit_jax.main --dry_run` and `python -m diffit_jax.sample --dry_run_tpu` print these.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from diffit_jax import inference, models, sharding as sharding_lib, tpu, train
from diffit_jax.diffusion import samplers
from diffit_jax.models import tmsa

GIB = 2 ** 30


class Plan(NamedTuple):
  """One device's share of one call of a compiled program, in bytes and FLOPs."""
  arguments: float     # inputs held on the device (state, weights, its slice of the batch)
  outputs: float
  aliased: float       # outputs written into donated inputs' buffers
  temporaries: float   # the compiler's scratch memory
  flops: float         # the compiler's count for this device (a multiply-add is 2)
  bytes_accessed: float
  compile_seconds: float
  code: float = 0.0    # the compiled program itself (held in a TPU's HBM too)
  partial_bytes: bool = False  # bytes_accessed counts a loop's body once (scanned blocks)

  @property
  def total(self) -> float:
    """Peak memory the compiler planned: what the program holds at once."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


class DoesNotFitError(Exception):
  """The compiler refused a program: it needs more memory than the device has.

  Attributes:
    reason: the compiler's own sentence (e.g. "the total memory required for HLO
      temporaries (16.62G) exceeds available HBM (15.75G)").
    compile_seconds: how long the compiler took to find out.
  """

  def __init__(self, reason: str, compile_seconds: float):
    super().__init__(reason)
    self.reason, self.compile_seconds = reason, compile_seconds


def compile_plan(lowered: Any) -> Plan:
  """Compiles a `jax.jit(...).lower(...)` result and reads the compiler's plan.

  Raises:
    DoesNotFitError: the compiler (a TPU's refuses programs larger than its HBM) ran out
      of device memory.
  """
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if not message.startswith("RESOURCE_EXHAUSTED") or "memory" not in message:
      raise
    reason = message.split(":", 1)[1].strip().removeprefix("Ran out of memory on HBM, ")
    raise DoesNotFitError(reason.splitlines()[0].rstrip("."),
                          time.perf_counter() - start) from None
  return plan_of(compiled, compile_seconds=time.perf_counter() - start)


def plan_of(compiled: Any, *, compile_seconds: float = 0.0) -> Plan:
  """The compiler's plan of a compiled program (`jax.jit(...).lower(...).compile()`)."""
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one per program
  return Plan(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
              aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
              flops=float(cost.get("flops", 0.0)),
              bytes_accessed=float(cost.get("bytes accessed", 0.0)),
              compile_seconds=compile_seconds,
              code=m.generated_code_size_in_bytes)


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------------------
# The programs.


def for_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> ml_collections.ConfigDict:
  """`config` as it would run on `mesh`'s devices.

  `config.model.attention="auto"` picks the attention kernel by JAX's default backend; a
  program compiled here for another platform (a TPU slice, from a CPU machine) gets the
  kernel that platform would pick.
  """
  platform = mesh.devices.flat[0].platform
  if platform == jax.default_backend():
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.attention = tmsa.resolve_attention(config.model.attention, config.model.dtype,
                                                  platform)
  return config


def train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """The lowered train step of `config` over `mesh` at the global `config.batch_size`.

  The state (weights, EMA, optimizer moments) is sharded as `config.mesh` says, each device
  holds its slice of the batch, and the state is donated, as in training.
  """
  config = for_mesh(config, mesh)
  setup, _ = train.create_train_state(config, mesh, initialize=False)
  step = train.make_train_step(config, setup, mesh)
  shape = models.input_shape(config.model, int(config.batch_size))  # (B, H, W, C) global
  batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  return step.lower(setup.abstract_state, batch)


def sampler(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int, *,
            num_steps: int | None = None) -> Any:
  """The lowered sampler of `config.sampler` for one global batch, weights replicated.

  This is the whole chain (every step and the guidance) as `python -m diffit_jax.sample`
  runs it; the VAE decode that follows is `vae_decode`.
  """
  config = for_mesh(config, mesh)
  graphdef, state = inference.abstract_network(config)
  s = samplers.make_sampler(samplers.SamplerConfig.from_config(config, num_steps=num_steps),
                            models.apply_fn(graphdef), models.input_shape(config.model)[1:],
                            mesh=mesh)
  batch = jax.sharding.NamedSharding(mesh, samplers.batch_spec(mesh))
  labels = (jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch)
            if config.model.num_classes else None)
  indices = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch)
  seed = jax.ShapeDtypeStruct((), jnp.uint32)
  params = _abstract(state, sharding_lib.replicated(mesh))
  return s.jitted.lower(params, labels, indices, seed, None)


def _vae(vae_config: Any) -> tuple[Any, Any]:
  """(graphdef, abstract state) of an `AutoencoderKL` (default: the SD VAE)."""
  from diffit_jax.models import vae  # pylint: disable=g-import-not-at-top
  return nnx.split(nnx.eval_shape(lambda: vae.AutoencoderKL(vae_config or vae.VAEConfig(),
                                                             rngs=nnx.Rngs(0))))


def vae_decode(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int, *,
               vae_config: Any = None) -> Any:
  """The lowered VAE decode (default: the SD VAE) of one global batch of `config`'s latents
  to uint8 images."""
  graphdef, state = _vae(vae_config)
  decode = inference.vae_decoder(graphdef, inference.uint8_rounding(config))
  z = jax.ShapeDtypeStruct(models.input_shape(config.model, batch_size), jnp.float32,
                           sharding=sharding_lib.batch_sharding(mesh))
  return decode.lower(_abstract(state, sharding_lib.replicated(mesh)), z)


def vae_encode(mesh: Mesh, batch_size: int, resolution: int, *, vae_config: Any = None) -> Any:
  """The lowered VAE encode (default: the SD VAE) of one global batch and its mirror images,
  as `python -m diffit_jax.encode` runs it."""
  from diffit_jax import encode  # pylint: disable=g-import-not-at-top
  graphdef, state = _vae(vae_config)
  images = jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), jnp.float32,
                                sharding=sharding_lib.batch_sharding(mesh))
  return encode.vae_encoder(graphdef).lower(_abstract(state, sharding_lib.replicated(mesh)),
                                            images)


def fid_features(mesh: Mesh, batch_size: int, resolution: int) -> Any:
  """The lowered FID Inception on one global batch of uint8 images, as FID computes it."""
  from diffit_jax.convert import inception  # pylint: disable=g-import-not-at-top
  from diffit_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(inception.abstract_inception())
  data = sharding_lib.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((batch_size, resolution, resolution, 3), jnp.uint8,
                                sharding=data)
  valid = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=data)
  return features.inception_forward.lower(
      _abstract(state, sharding_lib.replicated(mesh)), images, valid, graphdef=graphdef,
      out_sharding=sharding_lib.replicated(mesh))


# ----------------------------------------------------------------------------------------
# Reading a plan.


def memory_line(plan: Plan, label: str) -> str:
  """`label: total = state and batch + temporaries + outputs not donated`, in GiB."""
  gib = lambda x: f"{x / GIB:.3f} GiB"
  return (f"{label}: {gib(plan.total)} = state and batch {gib(plan.arguments)} + XLA "
          f"temporaries {gib(plan.temporaries)} + outputs not donated "
          f"{gib(plan.outputs - plan.aliased)}")


def with_unrolled_work(plan: Plan, flops: float, bytes_accessed: float = 0.0, *,
                       partial_bytes: bool = False) -> Plan:
  """`plan` with its FLOPs and bytes raised to counts that see through loops.

  XLA's cost analysis counts a loop's body once: the sampler's steps (a `fori_loop`) and
  scanned blocks would be counted as one. Callers pass the work the loop repeats (e.g.
  network evaluations x the unrolled network's FLOPs, or x the weights each evaluation
  reads), so the roofline stays a bound of the whole call. `partial_bytes` says that the
  bytes still see a loop's body once (scanned blocks): the bound is then the FLOPs' alone.
  """
  return plan._replace(flops=max(plan.flops, flops),
                       bytes_accessed=max(plan.bytes_accessed, bytes_accessed),
                       partial_bytes=partial_bytes)


def with_train_step_work(plan: Plan, config: ml_collections.ConfigDict, per_device_batch: int,
                         forward_flops: float | None = None) -> Plan:
  """`with_unrolled_work` for a train step: the unrolled forward's FLOPs (XLA's count, or
  `forward_flops` when already known) x 3, since the backward pass multiplies each matmul
  twice (remat's extra forward not counted)."""
  if forward_flops is None:
    forward_flops = models.forward_flops(config.model)
  flops = 3 * forward_flops * per_device_batch
  scanned = config.model.name == "latent" and bool(config.model.scan_blocks)
  return with_unrolled_work(plan, flops, partial_bytes=scanned)


def sampler_work(config: ml_collections.ConfigDict, per_device_batch: int) -> tuple[float, float]:
  """(FLOPs, bytes) per device of a whole sampling chain: every network evaluation (guided
  ones on a doubled batch) costs the unrolled forward's FLOPs and reads every weight."""
  cfg = samplers.SamplerConfig.from_config(config)
  rows = per_device_batch * (2 if cfg.guidance.active else 1)
  _, state = inference.abstract_network(config)
  weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  return cfg.nfe * models.forward_flops(config.model) * rows, cfg.nfe * weight_bytes


def roofline_seconds(plan: Plan, peak_tflops: float, hbm_gbps: float) -> float:
  """A lower bound of one call's time: FLOPs at the chip's peak, or bytes at its bandwidth."""
  return max(plan.flops / (peak_tflops * 1e12), plan.bytes_accessed / (hbm_gbps * 1e9))



# ----------------------------------------------------------------------------------------
# TPU plans.


def tpu_lines(plan: Plan, tpu_slice: tpu.Slice, *, items: int, item: str = "img") -> list[str]:
  """The plan per chip against the chip's HBM, and the roofline bound of `items` per call."""
  chip = tpu_slice.chip
  need = plan.total + plan.code
  verdict = "fits" if fits(plan, tpu_slice) else "DOES NOT FIT"
  seconds = roofline_seconds(plan, chip.peak_tflops, chip.hbm_gbps)
  compute = plan.flops / (chip.peak_tflops * 1e12)
  memory = plan.bytes_accessed / (chip.hbm_gbps * 1e9)
  rate = f"{items / seconds:,.1f} {item}/s" if seconds else "no bound"
  return [
      f"  per chip: {need / GIB:.2f} of {chip.hbm_gib:g} GiB HBM, {verdict}: state and batch "
      f"{plan.arguments / GIB:.3f} + XLA temporaries {plan.temporaries / GIB:.3f} + outputs not "
      f"donated {(plan.outputs - plan.aliased) / GIB:.3f} + the program {plan.code / GIB:.3f} GiB",
      f"  per chip per call: {plan.flops / 1e12:.3f} TFLOP and {plan.bytes_accessed / 1e9:.2f} "
      "GB of HBM traffic (the compiler's counts, with loops counted as unrolled)",
      f"  roofline bound: at least {seconds * 1e3:.1f} ms per call (FLOPs at the "
      f"{chip.peak_tflops:g} TFLOP/s bf16 peak: {compute * 1e3:.1f} ms; bytes at "
      f"{chip.hbm_gbps:g} GB/s: {memory * 1e3:.1f} ms), so at most {rate} on {tpu_slice.name}: "
      "a bound from the compiler's counts, not a measurement"
      + ("; the bytes count one scanned block, so it is the FLOPs' bound alone"
         if plan.partial_bytes else ""),
  ]


def fits(plan: Plan, tpu_slice: tpu.Slice) -> bool:
  """Whether the program and its memory plan fit one chip's HBM."""
  return plan.total + plan.code <= tpu_slice.chip.hbm_gib * GIB


def _slice_line(what: str, tpu_slice: tpu.Slice, devices: list[Any],
                plan: Plan | DoesNotFitError) -> str:
  return (f"{what} on {tpu_slice.name} ({tpu_slice.topology}: {tpu_slice.num_chips} chips of "
          f"{tpu_slice.chip.name}, {tpu.num_hosts(devices)} host process(es)), compiled by "
          f"libtpu in {plan.compile_seconds:.0f} s")


def _plan_lines(plan: Plan | DoesNotFitError, tpu_slice: tpu.Slice, items: int,
                item: str = "img") -> list[str]:
  if isinstance(plan, DoesNotFitError):
    return [f"  per chip: DOES NOT FIT {tpu_slice.chip.hbm_gib:g} GiB HBM: the TPU compiler "
            f"refused it ({plan.reason})"]
  return tpu_lines(plan, tpu_slice, items=items, item=item)


def _fits(plan: Plan | DoesNotFitError, tpu_slice: tpu.Slice) -> bool:
  return not isinstance(plan, DoesNotFitError) and fits(plan, tpu_slice)


def compile_plan_or_refusal(lowered: Any) -> Plan | DoesNotFitError:
  """`compile_plan`, or the compiler's refusal when the program does not fit."""
  try:
    return compile_plan(lowered)
  except DoesNotFitError as e:
    return e


def with_fields(config: ml_collections.ConfigDict, fields: dict[str, Any]
                ) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `fields` ("model.remat", "batch_size") set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in fields.items():
    *parents, name = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _fitting_candidates(config: ml_collections.ConfigDict, num_chips: int):
  """Settings that shrink the train step's memory, least intrusive first."""
  remat = ({"model.remat": True, "model.scan_blocks": True}
           if config.model.name == "latent" and not config.model.remat else None)
  fsdp = ({"mesh.fsdp": num_chips, "mesh.data": 1}
          if num_chips > 1 and int(config.mesh.fsdp) != num_chips else None)
  both = {**remat, **fsdp} if remat and fsdp else None
  smallest = {**(remat or {}), **(fsdp or {})}
  for fields in (remat, fsdp, both):
    if fields:
      yield fields
  batch = int(config.batch_size) // 2
  while batch >= num_chips and batch % num_chips == 0:
    yield {**smallest, "batch_size": batch}
    batch //= 2


def tpu_train_report(config: ml_collections.ConfigDict, slice_name: str):
  """Lines (yielded as each compile ends) of the train step's plan on a TPU slice.

  A step that does not fit one chip's HBM is compiled again with remat, FSDP over every
  chip, both, then smaller global batches, until one fits; the report names it.
  """
  tpu_slice = tpu.parse_slice(slice_name)
  devices = tpu.compile_only_devices(tpu_slice)

  forward = models.forward_flops(config.model)  # the same network in every candidate

  def compiled(config):
    mesh = sharding_lib.create_mesh(config.mesh, devices)
    p = compile_plan_or_refusal(train_step(config, mesh))
    if isinstance(p, Plan):
      p = with_train_step_work(p, config, int(config.batch_size) // mesh.size, forward)
    return mesh, p

  mesh, p = compiled(config)
  m = config.model
  yield (_slice_line("tpu_train_step_plan", tpu_slice, devices, p) + f"; global batch "
         f"{config.batch_size} over mesh {dict(mesh.shape)}, dtype={m.dtype}"
         + (f", remat={m.remat}, scan_blocks={m.scan_blocks}" if m.name == "latent" else ""))
  yield from _plan_lines(p, tpu_slice, int(config.batch_size))
  if _fits(p, tpu_slice):
    return
  for fields in _fitting_candidates(config, tpu_slice.num_chips):
    flags = " ".join(f"--config.{k}={v}" for k, v in fields.items())
    _, q = compiled(with_fields(config, fields))
    need = ("refused by the compiler" if isinstance(q, DoesNotFitError)
            else f"{(q.total + q.code) / GIB:.2f} GiB per chip")
    yield (f"  with {flags}: {need}, " + ("fits" if _fits(q, tpu_slice) else "does not fit")
           + f" (compiled in {q.compile_seconds:.0f} s)")
    if _fits(q, tpu_slice):
      yield f"  to fit {tpu_slice.name}: {flags}"
      return
  yield f"  nothing tried fits {tpu_slice.name}: use a slice with more chips or HBM per chip"


def tpu_sampling_report(config: ml_collections.ConfigDict, slice_name: str, batch_size: int, *,
                        num_samples: int = 0):
  """Lines of the sampler's plan (and, for a latent model, the VAE decode's) on a TPU slice.

  The sampler holds the network's weights, replicated, and runs the whole chain for one
  global batch; `num_samples` adds the roofline bound of drawing that many.
  """
  tpu_slice = tpu.parse_slice(slice_name)
  devices = tpu.compile_only_devices(tpu_slice)
  mesh = sharding_lib.create_mesh(config.get("mesh"), devices)
  p = compile_plan_or_refusal(sampler(config, mesh, batch_size))
  if isinstance(p, Plan):
    p = with_unrolled_work(p, *sampler_work(config, batch_size // mesh.size))
  s = config.sampler
  yield (_slice_line("tpu_sampler_plan", tpu_slice, devices, p) + f"; {s.name}, "
         f"{s.num_steps} steps, guidance scale {s.guidance.scale}, global batch {batch_size} "
         f"over mesh {dict(mesh.shape)}")
  yield from _plan_lines(p, tpu_slice, batch_size, item="samples")
  d = None
  if config.model.name == "latent":
    d = compile_plan_or_refusal(vae_decode(config, mesh, batch_size))
    yield _slice_line("tpu_vae_decode_plan", tpu_slice, devices, d)
    yield from _plan_lines(d, tpu_slice, batch_size)
  if not all(_fits(x, tpu_slice) for x in (p, d) if x is not None):
    yield f"  does not fit {tpu_slice.name}: pass a smaller --batch_size"
    return
  seconds = sum(roofline_seconds(x, tpu_slice.chip.peak_tflops, tpu_slice.chip.hbm_gbps)
                for x in (p, d) if x is not None)
  if d is not None:
    # Both programs' weights stay on the chip; their scratch memory is not needed at once.
    held = p._replace(arguments=p.arguments + d.arguments, code=p.code + d.code,
                      temporaries=max(p.temporaries + p.outputs, d.temporaries + d.outputs),
                      outputs=0.0, aliased=0.0)
    yield (f"  sampler and decoder together: {(held.total + held.code) / GIB:.2f} of "
           f"{tpu_slice.chip.hbm_gib:g} GiB per chip: "
           + ("fits" if fits(held, tpu_slice) else "DOES NOT FIT: pass a smaller --batch_size"))
  if num_samples:
    calls = -(-num_samples // batch_size)
    yield (f"  {num_samples:,} samples: {calls} calls, at least {calls * seconds / 60:.1f} "
           f"minutes on {tpu_slice.name} (roofline bound, not a measurement)")
