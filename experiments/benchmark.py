"""Speed of diffit_jax against the PyTorch reference, in one run on one machine.

What is measured, for the latent DiffiT at 256 px (32x32x4 SD latents), per variant:
  * train step: forward + backward + AdamW + EMA. JAX runs the real jitted, donated
    `train.make_train_step` (ADM hybrid loss L_simple + L_vlb, label dropout, EMA); the
    PyTorch reference (`tests/torch_reference.py`) runs the same loss (ported below), the
    same optimizer (`torch.optim.AdamW`, foreach) and the same EMA, eager and under
    `torch.compile` (failures are caught and recorded).
  * forward: images/s of one jitted forward (JAX) and of the reference in inference mode.
  * the ratio JAX / PyTorch of throughputs (> 1: JAX is faster).
  * model FLOPs utilisation: forward FLOPs (XLA's cost analysis of the unrolled forward,
    `models.forward_flops`, checked against an analytic matmul count in the tests) x 3 for a
    train step, divided by the step time, as a fraction of the measured throughput of a
    large matmul in the compute dtype, timed in the same rounds as the step.
  * compile time (lower + compile) of the train step and forward; peak memory (host RSS on
    CPU with the high-water mark reset per measurement, `memory_stats()` on GPU/TPU) and
    XLA's own memory analysis of the compiled step.
Then:
  * the sampler: seconds per image of 250-step DDPM with power-cosine guidance (the official
    ImageNet-256 recipe) and of 18-step EDM Heun (35 NFE; the EDM formulation run on the
    latent network, whose cost per call is the same), and the share of time outside the
    network, by `sampler_overhead.py`'s method: the compiled sampler vs the network alone
    run NFE times in one jitted loop, and vs the same sampler with a zero-cost network.
    On CPU fewer steps are run (flags) and the time is extrapolated linearly in NFE.
  * the XL/2 train step lowered and compiled abstractly (ShapeDtypeStruct inputs): compile
    time and XLA's memory estimate, without allocating the 561 M-parameter state.

Timings: both frameworks start from the same random N(0, 0.02^2) weights (the official
zero-initialised head would back-propagate exact zeros). PyTorch runs in a worker process
of its own (`TorchWorker`), so neither framework's allocations disturb the other's. Each
measured function is compiled and warmed up first; then `--repeats` rounds run every
function of a variant in turn, in this process or the worker's (so load from other
processes hits them alike); each reports the median over rounds
(min, max, CPU time and page faults per call are in the JSON) with the 1-minute load
average of every round. On Linux CPUs the run re-executes itself under `RETAIN_MALLOC`
(`--malloc default` to measure the stock allocator). Unchanged on a GPU or TPU
(accelerator defaults: batch 64, all of S/2, B/2, XL/2, full sampler step counts).

Run:
  .venv/bin/python experiments/benchmark.py                 # CPU defaults: ~7 min on 2 cores
  .venv/bin/python experiments/benchmark.py --no-torch_compile   # faster: no Inductor builds
  .venv/bin/python experiments/benchmark.py --quick         # smoke run, ~1 minute
  .venv/bin/python experiments/benchmark.py --precision bf16 --batch_size 32 --xl
Writes experiments/results/benchmark_<platform>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffit_jax import models, sharding, train
from diffit_jax.config_lib import load_config
from diffit_jax.diffusion import samplers
from diffit_jax.diffusion.gaussian import get_named_beta_schedule
from diffit_jax.models.tmsa import resolve_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "imagenet256_latent.py")
TORCH_REFERENCE = os.path.join(ROOT, "tests", "torch_reference.py")
RESULTS_DIR = os.path.join(ROOT, "experiments", "results")
# A variant outside the size table, for smoke tests (built as config.model.variant="custom").
TINY = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)
OFFICIAL_DDPM_STEPS, OFFICIAL_HEUN_STEPS = 250, 18
WEIGHT_STD = 0.02  # random weights for both frameworks (see `random_weights`)
GIB = 2.0 ** 30
# `--malloc retain`: glibc keeps freed memory for reuse instead of returning it to the kernel.
# XLA:CPU allocates one temporary buffer per execution (2 GiB for an S/2 train step at batch
# 8); glibc serves such large blocks with a fresh mmap, so every step page-faults and the
# kernel zeroes gigabytes (about 0.4 M faults and 1-9 s of system time per step here).
# No mmap, no trimming and one arena make the next step reuse the same pages. It must be set
# before the process starts, so the benchmark re-executes itself with it (both frameworks
# then run under the same allocator). The same setting speeds up CPU training.
RETAIN_MALLOC = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
                 "glibc.malloc.arena_max=1")

# Per-platform defaults; `--quick` shrinks them to a smoke run. Flags given explicitly win.
DEFAULTS = {
    "cpu": dict(variants="S/2,B/2", batch_size=8, repeats=9, sampler_repeats=25, iters=1,
                ddpm_steps=4, heun_steps=2, sampler_batch=2, sampler_variant="S/2",
                matmul_size=2048, torch_compile=True),
    "accelerator": dict(variants="S/2,B/2,XL/2", batch_size=64, repeats=5, sampler_repeats=5,
                        iters=5, ddpm_steps=OFFICIAL_DDPM_STEPS, heun_steps=OFFICIAL_HEUN_STEPS,
                        sampler_batch=64, sampler_variant="XL/2", matmul_size=8192,
                        torch_compile=True),
    "quick": dict(variants="S/2", batch_size=2, repeats=2, sampler_repeats=2, iters=1,
                  ddpm_steps=2, heun_steps=2,
                  sampler_batch=2, sampler_variant="S/2", matmul_size=1024,
                  torch_compile=False),
}


# ----------------------------------------------------------------------------------------
# Measurement helpers: timing, memory, load.


def load_average() -> list[float]:
  """1-, 5- and 15-minute load averages (compare with the CPU count)."""
  return [round(x, 2) for x in os.getloadavg()]


def summarize(seconds: list[float]) -> dict[str, Any]:
  return dict(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
              samples_s=[round(s, 5) for s in seconds])


def measure(run: Callable[[], None], iters: int) -> dict[str, float]:
  """Per call of `run` (which waits for its result), over `iters` calls in this process.

  Besides wall time, the process's CPU time (user + system) and minor page faults: on a
  shared machine CPU time is less disturbed by other processes, and the faults show what
  fresh memory for temporaries costs (the kernel zeroes every new page).
  """
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  for _ in range(iters):
    run()
  seconds = (time.perf_counter() - start) / iters
  after = resource.getrusage(resource.RUSAGE_SELF)
  system = (after.ru_stime - before.ru_stime) / iters
  return dict(seconds=seconds, cpu_s=(after.ru_utime - before.ru_utime) / iters + system,
              system_s=system, faults=(after.ru_minflt - before.ru_minflt) / iters)


def local_runners(runners: dict[str, Callable[[], None]]) -> dict[str, Callable[[int], dict]]:
  """In-process functions as `time_interleaved` runners."""
  return {name: functools.partial(measure, run) for name, run in runners.items()}


def time_interleaved(runners: dict[str, Callable[[int], dict]], repeats: int, iters: int
                     ) -> tuple[dict[str, dict], list[float]]:
  """Seconds per call of every runner, over `repeats` rounds that run them all in turn.

  A runner takes a number of calls and returns `measure`'s figures for them, measured in
  the process that ran them (this one, or the PyTorch worker).
  Returns ({name: summary}, [1-minute load average after each round]).
  """
  samples = {name: [] for name in runners}
  loads = []
  for _ in range(repeats):
    for name, run in runners.items():
      samples[name].append(run(iters))
    loads.append(round(os.getloadavg()[0], 2))
  median = lambda name, key: statistics.median(m[key] for m in samples[name])
  return {name: dict(summarize([m["seconds"] for m in samples[name]]),
                     cpu_median_s=median(name, "cpu_s"),
                     system_median_s=median(name, "system_s"),
                     minor_faults_median=median(name, "faults"))
          for name in runners}, loads


def _proc_status_kib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return None


class PeakMemory:
  """Peak memory while a block runs: host RSS on CPU, device memory on accelerators.

  On Linux the RSS high-water mark is reset on entry (writing 5 to /proc/self/clear_refs),
  so the peak belongs to the block; elsewhere it is the process's peak so far. Device
  peaks (`memory_stats()["peak_bytes_in_use"]`) cannot be reset and are cumulative.
  """

  def __init__(self, torch_module: Any = None):
    self.torch = torch_module
    self.result: dict[str, Any] = {}

  def __enter__(self):
    self.reset = False
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:
      pass
    self.rss_before = _proc_status_kib("VmRSS")
    if self.torch is not None and self.torch.cuda.is_available():
      self.torch.cuda.reset_peak_memory_stats()
    return self

  def __exit__(self, *exc):
    peak = _proc_status_kib("VmHWM")
    if peak is None:
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    self.result = dict(host_peak_rss_gib=round(peak / 2 ** 20, 3),
                       host_rss_before_gib=round((self.rss_before or 0) / 2 ** 20, 3),
                       host_peak_is_per_block=self.reset)
    device = jax.local_devices()[0]
    if device.platform != "cpu":
      stats = device.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        self.result["jax_device_peak_gib_cumulative"] = round(stats["peak_bytes_in_use"] / GIB, 3)
    if self.torch is not None and self.torch.cuda.is_available():
      self.result["torch_cuda_peak_gib"] = round(self.torch.cuda.max_memory_allocated() / GIB, 3)
    return False


def memory_analysis(compiled: Any) -> dict[str, float] | None:
  """XLA's memory estimate of a compiled function, in GiB (None where unsupported)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes,
                           m.alias_size_in_bytes, m.temp_size_in_bytes)
  return dict(arguments_gib=round(arg / GIB, 3), outputs_gib=round(out / GIB, 3),
              aliased_gib=round(alias / GIB, 3), temp_gib=round(temp / GIB, 3),
              total_gib=round((arg + out - alias + temp) / GIB, 3))


def matmul_runner(size: int, dtype: Any) -> tuple[Callable[[], None], float]:
  """A jitted (size x size) @ (size x size) in `dtype` and its FLOPs: the device's peak."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  return (lambda: jax.block_until_ready(matmul(a, a))), 2.0 * size ** 3


# ----------------------------------------------------------------------------------------
# FLOPs: XLA's count (what MFU uses) and the analytic matmul count it is checked against.


def model_config(variant: str, *, input_size: int = 32, precision: str = "fp32") -> Any:
  """`config.model` of the ImageNet-256 latent config for `variant` ("S/2", ..., "tiny")."""
  config = load_config(CONFIG).model
  config.input_size = input_size
  config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
  if variant == "tiny":
    config.variant = models.CUSTOM_VARIANT
    config.update(TINY)
  else:
    config.variant = variant
  return config


def analytic_forward_flops(config: Any, batch_size: int = 1) -> float:
  """FLOPs of the matmuls of one latent DiffiT forward (2 per multiply-add).

  Counted from the architecture, not from XLA: patch embedding, time MLP, per block the
  spatial and temporal q/k/v projections (Eqs. 3-5), q k^T and attention x v (Eq. 6), the
  output projection and the MLP, then the final linear layer.
  """
  s = models.latent_sizes(config)
  d, depth, p = s["hidden_size"], s["depth"], s["patch_size"]
  c_in = config.in_channels
  c_out = 2 * c_in if config.learn_sigma else c_in
  n = (config.input_size // p) ** 2  # tokens
  window = config.get("window_size") or int(math.isqrt(n))
  t = window * window  # tokens per attention window
  hidden = int(d * config.mlp_ratio)
  per_image = (
      n * p * p * c_in * d                      # patch embedding
      + 256 * d + d * d                         # timestep MLP (256-wide sinusoid)
      + depth * (n * d * 3 * d                  # spatial q, k, v
                 + d * 3 * d                    # temporal q, k, v (one time token)
                 + 2 * n * t * d                # q k^T and attention x v
                 + n * d * d                    # output projection
                 + 2 * n * d * hidden)          # MLP
      + n * d * p * p * c_out)                  # final layer
  return 2.0 * per_image * batch_size


# ----------------------------------------------------------------------------------------
# The JAX side: the real train step, and a jitted forward.


def jax_train_config(variant: str, args: argparse.Namespace) -> Any:
  """The ImageNet-256 latent training config at the benchmark's variant, batch and precision."""
  config = load_config(CONFIG)
  config.model = model_config(variant, input_size=args.input_size, precision=args.precision)
  config.model.remat = args.remat
  config.model.attention = args.attention
  if args.remat:
    config.model.scan_blocks = True  # rematerialisation needs scanned blocks
  if args.scan_unroll != "config":
    config.model.scan_blocks = args.scan_unroll != "all"
    if config.model.scan_blocks:
      config.model.scan_unroll = int(args.scan_unroll)
  config.batch_size = args.batch_size
  return config


def benchmark_mesh(args: argparse.Namespace) -> jax.sharding.Mesh:
  devices = jax.devices()
  n = len(devices) if args.num_devices <= 0 else args.num_devices
  return sharding.create_mesh(None, devices[:n])


def jax_runners(variant: str, args: argparse.Namespace, mesh: jax.sharding.Mesh, *,
                with_forward: bool = True
                ) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
  """Compiles the real train step and a forward; returns runners and compile/memory facts."""
  config = jax_train_config(variant, args)
  b = args.batch_size
  info: dict[str, Any] = {}
  with PeakMemory() as mem:
    setup, state = train.create_train_state(config, mesh)
    params = random_weights(state.params)
    state = state._replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    step = train.make_train_step(config, setup, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch = {"image": jax.device_put(rng.standard_normal((b,) + latent_shape(args), np.float32),
                                     batch_sharding),
             "label": jax.device_put(rng.integers(0, 1000, b).astype(np.int32), batch_sharding)}
    start = time.perf_counter()
    lowered = step.lower(setup.abstract_state, batch)
    lower_s = time.perf_counter() - start
    compiled_step = lowered.compile()
    info["train_compile_s"] = round(time.perf_counter() - start, 3)
    info["train_lower_s"] = round(lower_s, 3)
    info["train_xla_memory"] = memory_analysis(compiled_step)
    holder = {"state": state}

    def train_once():
      holder["state"], metrics = compiled_step(holder["state"], batch)  # the state is donated
      jax.block_until_ready((holder["state"], metrics))

    train_once()
    train_once()
  info["train_memory"] = mem.result
  info["params"] = int(sum(x.size for x in jax.tree.leaves(holder["state"].params)))
  if not with_forward:
    return {"jax_train": train_once}, info

  with PeakMemory() as mem:
    graphdef = setup.graphdef
    forward = jax.jit(lambda params, x, t, y: nnx.merge(graphdef, params)(x, t, y))
    t = jax.device_put(rng.integers(0, 1000, b).astype(np.int32), batch_sharding)
    args_ = (holder["state"].params, batch["image"], t, batch["label"])
    start = time.perf_counter()
    compiled_forward = forward.lower(*args_).compile()
    info["forward_compile_s"] = round(time.perf_counter() - start, 3)

    def forward_once():
      # The latest weights: the previous ones were donated to the train step.
      jax.block_until_ready(compiled_forward(holder["state"].params, *args_[1:]))

    forward_once()
  info["forward_memory"] = mem.result
  return {"jax_train": train_once, "jax_forward": forward_once}, info


def random_weights(params: Any, seed: int = 0, std: float = WEIGHT_STD) -> Any:
  """Every float weight drawn from N(0, std^2), on the leaf's own sharding.

  The official init zeroes the output layer, so a fresh network back-propagates exact
  zeros; random weights (in both frameworks) make the backward pass do real arithmetic.
  """
  rng = np.random.default_rng(seed)
  def draw(x):
    value = (std * rng.standard_normal(x.shape)).astype(x.dtype)
    return jax.device_put(value, x.sharding)
  return jax.tree.map(draw, params)


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int]:
  return (args.input_size, args.input_size, 4)


# ----------------------------------------------------------------------------------------
# The PyTorch side: the reference network with the same loss, optimizer and EMA.


def import_torch_reference() -> Any:
  """tests/torch_reference.py as a module (it is not part of the package)."""
  spec = importlib.util.spec_from_file_location("diffit_torch_reference", TORCH_REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class TorchADMLoss:
  """ADM's hybrid loss (L_simple + L_vlb, learned-range variance) in PyTorch.

  The same computation as `diffusion.adm_loss` with the config's linear 1000-step
  schedule, so both frameworks do the same work per step (it is elementwise and cheap
  next to the network either way).
  """

  def __init__(self, torch, device, num_timesteps: int = 1000):
    self.torch = torch
    betas = get_named_beta_schedule("linear", num_timesteps)  # float64 NumPy
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    tables = dict(
        sqrt_ac=np.sqrt(ac), sqrt_1m_ac=np.sqrt(1.0 - ac), sqrt_recip_ac=np.sqrt(1.0 / ac),
        sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        post_log_var=np.log(np.append(post_var[1], post_var[1:])),
        log_betas=np.log(betas), coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
    self.tables = {k: torch.tensor(v, dtype=torch.float32, device=device)
                   for k, v in tables.items()}

  def __call__(self, model, x0, y, t, noise):
    torch = self.torch
    g = lambda name: self.tables[name][t].view(-1, 1, 1, 1)
    c = x0.shape[1]
    x_t = g("sqrt_ac") * x0 + g("sqrt_1m_ac") * noise                    # q(x_t | x_0)
    out = model(x_t, t.float(), y).float()                               # (B, 2C, H, W)
    eps, var_values = out[:, :c], out[:, c:]
    # L_vlb trains the variance only: the mean uses a detached eps [IDDPM Sec. 3.1].
    frac = (var_values + 1) / 2
    log_var = frac * g("log_betas") + (1 - frac) * g("post_log_var")
    pred_x0 = g("sqrt_recip_ac") * x_t - g("sqrt_recipm1_ac") * eps.detach()
    mean = g("coef1") * pred_x0 + g("coef2") * x_t
    true_mean, true_log_var = g("coef1") * x0 + g("coef2") * x_t, g("post_log_var")
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                + (true_mean - mean) ** 2 * torch.exp(-log_var))
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = torch.exp(-0.5 * log_var)
    cdf_plus = cdf(inv_std * (x0 - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x0 - mean - 1.0 / 255.0))
    log_prob = torch.where(
        x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
        torch.where(x0 > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    nll = -log_prob.mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return (mse + vb).mean()


def torch_runners(torch, reference, *, variant: str, batch_size: int, input_size: int,
                  precision: str, device: str, compile_model: bool
                  ) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
  """The reference's train step and forward, eager or under `torch.compile`."""
  config = model_config(variant, input_size=input_size, precision=precision)
  sizes = models.latent_sizes(config)
  b, c = batch_size, 4
  tag = "torch_compile" if compile_model else "torch_eager"
  info: dict[str, Any] = {}
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16,
                                    enabled=precision == "bf16")
  torch.manual_seed(0)
  model = reference.LatentDiffiT(input_size=input_size, in_channels=c,
                                 num_classes=config.num_classes, learn_sigma=True,
                                 **sizes).to(device)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, WEIGHT_STD)  # as `random_weights` does for JAX
  net = torch.compile(model) if compile_model else model
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0, foreach=True)
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  loss_fn = TorchADMLoss(torch, device)
  x0 = torch.randn(b, c, input_size, input_size, device=device)
  labels = torch.randint(0, config.num_classes, (b,), device=device)

  def train_once():
    model.train()
    # The per-step draws the JAX step makes: t, noise and label dropout (p = 0.1).
    t = torch.randint(0, 1000, (b,), device=device)
    noise = torch.randn_like(x0)
    y = torch.where(torch.rand(b, device=device) < 0.1, config.num_classes, labels)
    with autocast():
      loss = loss_fn(net, x0, y, t, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The JAX step reports the global gradient norm; compute it here too.
    norms = torch._foreach_norm([p.grad for p in params])  # pylint: disable=protected-access
    torch.linalg.vector_norm(torch.stack(norms))
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - 0.9999)  # pylint: disable=protected-access
    sync()

  t_fixed = torch.randint(0, 1000, (b,), device=device).float()

  def forward_once():
    model.eval()
    with torch.inference_mode(), autocast():
      net(x0, t_fixed, labels)
    sync()

  for name, fn in (("train", train_once), ("forward", forward_once)):
    with PeakMemory(torch) as mem:
      start = time.perf_counter()
      fn()  # compiles under torch.compile
      first_s = time.perf_counter() - start
      fn()
    info[f"{name}_first_call_s"] = round(first_s, 3)
    info[f"{name}_memory"] = mem.result
  info["params"] = int(sum(p.numel() for p in params))
  return {f"{tag}_train": train_once, f"{tag}_forward": forward_once}, info


class TorchWorker:
  """The PyTorch reference in a process of its own, driven over a pipe (`serve_torch`).

  Each framework keeps its own heap. In one process, PyTorch's allocations land in the
  memory XLA frees between steps, and XLA's next step page-faults fresh memory instead
  (about 50 k faults and 1.2 s of system time per S/2 train step on a 2-core CPU), a cost
  neither framework has when it runs alone. The rounds still interleave the two (the
  parent asks the worker for a measurement and waits), so load from other processes hits
  both alike.
  """

  def __init__(self, device: str):
    self.device = device  # "cpu" or "cuda"
    # The worker imports this module, hence JAX; keep that JAX off the accelerator.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--torch_worker", device],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self.request(op="info")
    if "error" in self.info:
      self.close()
      raise RuntimeError(self.info["error"])

  def request(self, **message: Any) -> dict[str, Any]:
    self.process.stdin.write(json.dumps(message) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker exited with code {self.process.wait()}; "
                         "its error is printed above.")
    return json.loads(line)

  def runners(self, **settings: Any) -> tuple[dict[str, Callable[[int], dict]], dict]:
    """`torch_runners(**settings)` in the worker, as `time_interleaved` runners."""
    reply = self.request(op="prepare", settings=settings)
    if "error" in reply:
      return {}, reply
    return ({name: functools.partial(self.measure, name) for name in reply["runners"]},
            reply["info"])

  def measure(self, name: str, iters: int) -> dict[str, float]:
    return self.request(op="measure", name=name, iters=iters)

  def release(self) -> None:
    """Frees the worker's models (between variants)."""
    self.request(op="release")

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.close()
      self.process.wait()


def serve_torch(device: str) -> None:
  """The worker's side: answers `TorchWorker`'s requests, one JSON line each."""
  replies = sys.stdout
  sys.stdout = sys.stderr  # prints (torch.compile's among them) must not corrupt replies
  try:
    import torch  # pylint: disable=g-import-not-at-top
    reference = import_torch_reference()
  except ImportError as e:
    torch = None
    failure = f"PyTorch unavailable: {e}"
  else:
    failure = None
    if device == "cuda":
      if torch.cuda.is_available():
        # JAX's default float32 matmul precision on GPU allows TF32; let PyTorch use it too.
        torch.set_float32_matmul_precision("high")
      else:
        failure = "PyTorch sees no CUDA device"
  runners: dict[str, Callable[[], None]] = {}
  for line in sys.stdin:
    message = json.loads(line)
    if message["op"] == "info":
      reply = (dict(error=failure) if failure else
               dict(torch=torch.__version__, torch_threads=torch.get_num_threads()))
    elif message["op"] == "prepare":
      try:
        more, info = torch_runners(torch, reference, device=device, **message["settings"])
        runners.update(more)
        reply = dict(runners=sorted(more), info=info)
      except Exception as e:  # pylint: disable=broad-except
        # torch.compile needs a working C++ toolchain on CPU; record why it failed.
        reply = dict(error=f"{type(e).__name__}: {e}"[:2000],
                     traceback=traceback.format_exc()[-2000:])
    elif message["op"] == "measure":
      reply = measure(runners[message["name"]], message["iters"])
    else:  # "release"
      runners.clear()
      gc.collect()
      reply = {}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


# ----------------------------------------------------------------------------------------
# One variant: every runner, interleaved.


def benchmark_variant(variant: str, args: argparse.Namespace, mesh,
                      worker: TorchWorker | None) -> dict:
  """Train step and forward of `variant` in JAX and PyTorch, timed in the same rounds."""
  config = model_config(variant, input_size=args.input_size, precision=args.precision)
  b = args.batch_size
  result: dict[str, Any] = dict(batch_size=b, load_average_start=load_average())
  xla_fwd = models.forward_flops(config, b) / b
  analytic = analytic_forward_flops(config) 
  result.update(forward_flops_per_image=xla_fwd, analytic_forward_flops_per_image=analytic,
                flops_source="XLA cost analysis of the unrolled forward (models.forward_flops)",
                train_flops_per_image=3 * xla_fwd)
  print(f"[{variant}] compiling the JAX train step and forward ...", flush=True)
  jax_fns, result["jax"] = jax_runners(variant, args, mesh)
  result["params"] = result["jax"]["params"]
  runners = local_runners(jax_fns)
  modes = [False] + ([True] if args.torch_compile else []) if worker is not None else []
  for compile_model in modes:
    tag = "torch_compile" if compile_model else "torch_eager"
    print(f"[{variant}] preparing {tag} ...", flush=True)
    more, result[tag] = worker.runners(
        variant=variant, batch_size=b, input_size=args.input_size, precision=args.precision,
        compile_model=compile_model)
    runners.update(more)
  dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
  matmul, matmul_flops = matmul_runner(args.matmul_size, dtype)
  runners["matmul_peak"] = functools.partial(measure, matmul)
  print(f"[{variant}] timing {sorted(runners)}: {args.repeats} rounds x {args.iters} calls",
        flush=True)
  times, loads = time_interleaved(runners, args.repeats, args.iters)
  if worker is not None:
    worker.release()
  result["times"] = times
  result["load_average_per_round"] = loads
  result["load_average_end"] = load_average()

  peak = matmul_flops / times["matmul_peak"]["median_s"]
  result["matmul_peak_flops_per_s"] = peak
  result["matmul_peak_flops_per_s_best"] = matmul_flops / times["matmul_peak"]["min_s"]
  throughput, mfu = {}, {}
  for name, summary in times.items():
    if name == "matmul_peak":
      continue
    s = summary["median_s"]
    throughput[name] = b / s
    flops = (3 if name.endswith("_train") else 1) * xla_fwd * b
    mfu[name] = flops / s / peak
  result["images_per_s"] = throughput
  result["mfu"] = mfu
  ratios = {}
  for tag in ("torch_eager", "torch_compile"):
    for kind in ("train", "forward"):
      if f"{tag}_{kind}" in throughput:
        ratios[f"{kind}_vs_{tag}"] = throughput[f"jax_{kind}"] / throughput[f"{tag}_{kind}"]
  result["jax_over_torch"] = ratios
  # The same ratios from each runner's fastest round: the least disturbed by other load.
  result["jax_over_torch_best_round"] = {
      f"{kind}_vs_{tag}": times[f"{tag}_{kind}"]["min_s"] / times[f"jax_{kind}"]["min_s"]
      for tag in ("torch_eager", "torch_compile") for kind in ("train", "forward")
      if f"{tag}_{kind}" in times}
  print(f"[{variant}] img/s {json.dumps({k: round(v, 3) for k, v in throughput.items()})}"
        f" ratios {json.dumps({k: round(v, 3) for k, v in ratios.items()})}", flush=True)
  return result


# ----------------------------------------------------------------------------------------
# The sampler: seconds per image and the time outside the network.


def benchmark_sampler(args: argparse.Namespace, mesh) -> dict:
  """DDPM-250 with guidance and EDM Heun-18 on a latent DiffiT, scaled down where asked."""
  config = jax_train_config(args.sampler_variant, args).model
  model = models.build_model(config, rngs=nnx.Rngs(0))
  apply_fn, state = samplers.nnx_apply_fn(model)
  shape = latent_shape(args)
  c = shape[-1]
  b = args.sampler_batch
  rng = np.random.default_rng(0)
  data = sharding.batch_sharding(mesh)
  labels = jax.device_put(rng.integers(0, config.num_classes, b).astype(np.int32), data)
  indices = jax.device_put(np.arange(b, dtype=np.int32), data)
  seed = jnp.uint32(0)
  settings = {
      "ddpm_250_guided": (
          dict(name="ddpm", num_steps=args.ddpm_steps, guidance_scale=4.4,
               guidance_schedule="power_cosine", guidance_power=4.0, guidance_channels=3,
               num_classes=config.num_classes),
          OFFICIAL_DDPM_STEPS),
      # EDM's Heun sampler [EDM Alg. 1]; the latent network takes c_noise as its time input,
      # which costs the same as a timestep index.
      "edm_heun_18": (
          dict(name="heun", formulation="edm", num_steps=args.heun_steps,
               num_classes=config.num_classes),
          OFFICIAL_HEUN_STEPS),
  }
  result: dict[str, Any] = dict(variant=args.sampler_variant, batch_size=b,
                                load_average_start=load_average())
  for key, (cfg_dict, official_steps) in settings.items():
    cfg = samplers.SamplerConfig.from_config(cfg_dict)
    adm = cfg.formulation == "adm"
    # The EDM formulation reads the eps channels only (no learned variance).
    net_fn = apply_fn if adm else (lambda p, x, t, y: apply_fn(p, x, t, y)[..., :c])
    sampler = samplers.make_sampler(cfg, net_fn, shape, mesh=mesh)
    start = time.perf_counter()
    compiled = sampler.jitted.lower(state, labels, indices, seed).compile()
    compile_s = time.perf_counter() - start

    def trivial_fn(params, x, t, y):  # a network that costs nothing: the loop alone
      del params, t, y
      eps = 0.5 * x
      return jnp.concatenate([eps, jnp.zeros_like(eps)], -1) if adm else eps
    trivial = samplers.make_sampler(cfg, trivial_fn, shape, mesh=mesh).jitted.lower(
        state, labels, indices, seed).compile()

    net_batch = 2 * b if cfg.guidance.active else b
    x = jax.device_put(np.ones((net_batch,) + shape, np.float32), data)
    t = jax.device_put(np.full((net_batch,), 500, np.int32 if adm else np.float32), data)
    y = jax.device_put(np.zeros((net_batch,), np.int32), data)

    @jax.jit
    def network_only(params, x, t, y):
      def body(_, x):  # each forward depends on the previous one, as in the sampler
        return 0.5 * x + 0.5 * net_fn(params, x, t, y)[..., :c]
      return jax.lax.fori_loop(0, cfg.nfe, body, x)
    network = network_only.lower(state, x, t, y).compile()

    runners = {
        "full": lambda: jax.block_until_ready(compiled(state, labels, indices, seed)),
        "network_only": lambda: jax.block_until_ready(network(state, x, t, y)),
        "trivial_network": lambda: jax.block_until_ready(trivial(state, labels, indices, seed)),
    }
    with PeakMemory() as mem:
      for run in runners.values():
        run()
    print(f"[sampler {key}] timing {cfg.steps} steps ({cfg.nfe} NFE) x {args.sampler_repeats} "
          "rounds",
          flush=True)
    times, loads = time_interleaved(local_runners(runners), args.sampler_repeats, 1)
    full, net, triv = (times[k]["median_s"] for k in ("full", "network_only", "trivial_network"))
    # The rounds interleave the calls, so round i's full and network-only times saw the
    # same load: the median of per-round differences is steadier than a difference of medians.
    per_round = [(f - n) / f for f, n in zip(times["full"]["samples_s"],
                                              times["network_only"]["samples_s"])]
    official_nfe = (2 * official_steps - 1) if cfg.name == "heun" else official_steps
    scale = official_nfe / cfg.nfe
    result[key] = dict(
        measured_steps=cfg.steps, measured_nfe=cfg.nfe, official_steps=official_steps,
        official_nfe=official_nfe, extrapolated=scale != 1.0, network_batch=net_batch,
        compile_s=round(compile_s, 3), times=times, load_average_per_round=loads,
        seconds_per_image=full * scale / b,
        network_seconds_per_image=net * scale / b,
        # Two estimates of the share outside the network: the difference of two timings
        # (noisy on a shared CPU) and the zero-cost-network sampler (robust).
        overhead_fraction=statistics.median(per_round),
        overhead_fraction_per_round=[round(x, 4) for x in per_round],
        overhead_fraction_trivial_network=triv / full,
        memory=mem.result)
    print(f"[sampler {key}] {result[key]['seconds_per_image']:.3f} s/image, overhead "
          f"{result[key]['overhead_fraction']:.3f} (difference), "
          f"{result[key]['overhead_fraction_trivial_network']:.4f} (trivial network)",
          flush=True)
  result["load_average_end"] = load_average()
  return result


# ----------------------------------------------------------------------------------------
# XL/2: the train step compiled abstractly.


def xl_compile(args: argparse.Namespace, mesh) -> dict:
  """Lower + compile the XL/2 train step from ShapeDtypeStructs (no state is allocated)."""
  config = jax_train_config("XL/2", args)
  config.model.input_size = 32
  start = time.perf_counter()
  setup, _ = train.create_train_state(config, mesh, initialize=False)
  step = train.make_train_step(config, setup, mesh)
  build_s = time.perf_counter() - start
  b = args.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 4), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  start = time.perf_counter()
  lowered = step.lower(setup.abstract_state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  total = time.perf_counter() - start
  return dict(batch_size=b, precision=args.precision, build_s=round(build_s, 3),
              lower_s=round(lower_s, 3), compile_s=round(total, 3),
              xla_memory=memory_analysis(compiled), load_average=load_average())


# ----------------------------------------------------------------------------------------
# Report.


def targets(report: dict) -> dict[str, Any]:
  """The speed targets, evaluated on this run's figures.

  The targets: the CPU speed targets, a train step at least 1.3x and a forward at least
  1.5x as fast as PyTorch eager (evaluated wherever the reference ran); each sampler's time
  outside the network under 5%; the XL/2 train step compiled in under 60 s.
  """
  out: dict[str, Any] = {}
  for variant, r in report["variants"].items():
    ratios = r.get("jax_over_torch", {})
    for kind, target in (("train", 1.3), ("forward", 1.5)):
      ratio = ratios.get(f"{kind}_vs_torch_eager")
      if ratio is None:
        continue
      # What the target asks of JAX in MFU, and the ratio JAX would reach if every FLOP
      # ran at the measured matmul peak (100% MFU): a target above that ceiling cannot
      # be met on this machine by any implementation.
      mfu_eager = r["mfu"][f"torch_eager_{kind}"]
      out[f"{variant} {kind} >= {target}x torch eager"] = dict(
          value=round(ratio, 3), holds=bool(ratio >= target),
          mfu_needed=round(target * mfu_eager, 3), ceiling=round(1 / mfu_eager, 3),
          note=f"needs {target * mfu_eager:.0%} MFU; at 100% MFU JAX would be "
               f"{1 / mfu_eager:.2f}x")
  for key in ("ddpm_250_guided", "edm_heun_18"):
    s = report.get("sampler", {}).get(key)
    if s:
      worst = max(s["overhead_fraction"], s["overhead_fraction_trivial_network"])
      out[f"sampler {key} overhead < 5%"] = dict(
          value=round(worst, 4), holds=bool(worst < 0.05),
          note="the larger of the two estimates")
  xl = report.get("xl2_train_step_compile", {})
  if "compile_s" in xl:
    out["XL/2 train-step compile < 60 s"] = dict(value=xl["compile_s"],
                                                 holds=bool(xl["compile_s"] < 60))
  return out


def markdown(report: dict) -> str:
  """The results as markdown tables (what README's Performance section shows)."""
  m = report["machine"]
  lines = [
      f"# diffit_jax benchmark ({m['platform']}: {m['device_kind']})",
      "",
      f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['host']}; jax {m['jax']}, "
      f"torch {m.get('torch', 'n/a')} ({m.get('torch_threads', '?')} threads). "
      f"Precision {report['settings']['precision']}; JAX blocks "
      f"{report['settings']['scan_unroll']} (--scan_unroll), attention "
      f"{report['settings']['attention']} ({report['settings']['attention_used']}). "
      f"Load average (1/5/15 min) at start {report['load_average_start']}, "
      f"end {report['load_average_end']}.",
      f"Command: `{report['command']}`; GLIBC_TUNABLES="
      f"`{report.get('glibc_tunables') or '(unset: default glibc malloc)'}`.",
      "",
      "Times are medians over interleaved rounds (see the JSON for min/max and the load per "
      "round). Train step = forward + backward + AdamW + EMA with the ADM hybrid loss in both "
      "frameworks. MFU = model FLOPs (x3 for a train step) / time / measured matmul peak.",
      "",
  ]
  f = lambda d, k, fmt="{:.2f}": fmt.format(d[k]) if k in d else "n/a"
  for kind, title in (("train", "Train step"), ("forward", "Forward")):
    lines += [f"{title} (images/s; JAX/PyTorch > 1 means JAX is faster):", "",
              "| model | batch | JAX | torch eager | torch.compile | JAX/eager (median; best "
              "round) | JAX/compile | MFU JAX | MFU eager | JAX compile s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, r in report["variants"].items():
      ips, ratio, mfu = r["images_per_s"], r["jax_over_torch"], r["mfu"]
      best = r.get("jax_over_torch_best_round", {})
      lines.append(
          f"| {variant} | {r['batch_size']} | {f(ips, f'jax_{kind}')} | "
          f"{f(ips, f'torch_eager_{kind}')} | {f(ips, f'torch_compile_{kind}')} | "
          f"{f(ratio, f'{kind}_vs_torch_eager')}x; {f(best, f'{kind}_vs_torch_eager')}x | "
          f"{f(ratio, f'{kind}_vs_torch_compile')}x | {f(mfu, f'jax_{kind}', '{:.1%}')} | "
          f"{f(mfu, f'torch_eager_{kind}', '{:.1%}')} | "
          f"{r['jax'][f'{kind}_compile_s']:.1f} |")
    lines.append("")
  peaks = [r["matmul_peak_flops_per_s"] / 1e9 for r in report["variants"].values()]
  if peaks:
    lines += ["", f"Measured matmul peak ({report['settings']['matmul_size']}^2, "
              f"{report['settings']['precision']}): "
              + ", ".join(f"{p:.0f}" for p in peaks) + " GFLOP/s (per variant's rounds)."]
  mem_rows = []
  for variant, r in report["variants"].items():
    xm = r["jax"].get("train_xla_memory") or {}
    row = (f"| {variant} | {r['jax']['train_memory']['host_peak_rss_gib']:.2f} | "
           f"{xm.get('total_gib', float('nan')):.2f} | ")
    te = r.get("torch_eager", {})
    row += (f"{te['train_memory']['host_peak_rss_gib']:.2f} |" if "train_memory" in te
            else "n/a |")
    tc = r.get("torch_compile", {})
    row += (f" {tc['train_first_call_s']:.1f} |" if "train_first_call_s" in tc
            else f" {'failed' if 'error' in tc else 'n/a'} |")
    jt = r["times"]["jax_train"]
    row += f" {jt['minor_faults_median']:.0f} | {jt['system_median_s']:.2f} |"
    mem_rows.append(row)
  if mem_rows:
    lines += ["", "| model | JAX train peak RSS GiB | JAX step XLA memory GiB | "
              "torch eager train peak RSS GiB | torch.compile first train call s | "
              "JAX step page faults | JAX step system s |",
              "|---|---|---|---|---|---|---|"] + mem_rows
  s = report.get("sampler")
  if s:
    lines += ["", f"Sampler ({s['variant']}, batch {s['batch_size']}; guided DDPM runs the "
              "network on a doubled batch):", "",
              "| sampler | measured steps (NFE) | s/image at official steps | "
              "outside network (difference) | outside network (zero-cost network) | compile s |",
              "|---|---|---|---|---|---|"]
    for key in ("ddpm_250_guided", "edm_heun_18"):
      r = s[key]
      lines.append(
          f"| {key} | {r['measured_steps']} ({r['measured_nfe']}) | "
          f"{r['seconds_per_image']:.3f}{' (extrapolated)' if r['extrapolated'] else ''} | "
          f"{r['overhead_fraction']:.1%} | {r['overhead_fraction_trivial_network']:.2%} | "
          f"{r['compile_s']:.1f} |")
  xl = report.get("xl2_train_step_compile", {})
  if "compile_s" in xl:
    mem = (xl.get("xla_memory") or {}).get("total_gib")
    lines += ["", f"XL/2 train step (batch {xl['batch_size']}), lowered and compiled "
              f"abstractly: {xl['compile_s']:.1f} s (lower {xl['lower_s']:.1f} s); XLA memory "
              f"estimate {mem if mem is not None else 'n/a'} GiB."]
  lines += ["", "Targets:", ""]
  for name, t in report["targets"].items():
    note = f" ({t['note']})" if "mfu_needed" in t else ""
    lines.append(f"- {name}: {t['value']} -> {'holds' if t['holds'] else 'MISSED'}{note}")
  return "\n".join(lines) + "\n"


def machine_info(torch_info: dict[str, Any] | None) -> dict[str, Any]:
  device = jax.devices()[0]
  cpu_model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  info = dict(platform=device.platform, device_kind=device.device_kind,
              num_devices=jax.device_count(), host=platform.machine(), cpu_model=cpu_model,
              cpu_count=os.cpu_count(), jax=jax.__version__, python=platform.python_version(),
              xla_flags=os.environ.get("XLA_FLAGS", ""))
  if torch_info is not None:
    info.update(torch_info)
  return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", help="comma-separated latent variants (S/2, B/2, XL/2, tiny)")
  p.add_argument("--xl", action="store_true", help="also time XL/2 (needs ~25 GiB at batch 8)")
  p.add_argument("--batch_size", type=int)
  p.add_argument("--repeats", type=int, help="interleaved timing rounds (median reported)")
  p.add_argument("--sampler_repeats", type=int,
                 help="interleaved sampler rounds: the sampler's share outside the network is a "
                      "difference of two timings, so on a noisy CPU it takes many short rounds")
  p.add_argument("--iters", type=int, help="calls per runner per round")
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--input_size", type=int, default=32, help="latent side (32: 256 px)")
  p.add_argument("--remat", action="store_true",
                 help="rematerialise blocks (config.model.remat; scans the blocks)")
  p.add_argument("--scan_unroll", default="config",
                 help="'config' (the config's choice), N (scan the blocks, N per iteration) "
                      "or 'all' (no loop: config.model.scan_blocks=False)")
  p.add_argument("--attention", default="auto",
                 help="config.model.attention of the JAX runs: auto, einsum, xla or cudnn")
  p.add_argument("--ddpm_steps", type=int, help="DDPM steps run; extrapolated to 250")
  p.add_argument("--heun_steps", type=int, help="Heun steps run; extrapolated to 18 (35 NFE)")
  p.add_argument("--sampler_batch", type=int)
  p.add_argument("--sampler_variant")
  p.add_argument("--matmul_size", type=int)
  p.add_argument("--num_devices", type=int, default=1,
                 help="devices the JAX runs use (<= 0: all); PyTorch uses one")
  p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="time the PyTorch reference")
  p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--xl_compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                 help="retain: rerun under GLIBC_TUNABLES that keep freed memory (CPU only)")
  p.add_argument("--quick", action="store_true", help="a smoke run: small batch, few steps")
  p.add_argument("--out_dir", default=RESULTS_DIR)
  args = p.parse_args(argv)
  kind = "quick" if args.quick else ("cpu" if jax.devices()[0].platform == "cpu"
                                     else "accelerator")
  for key, value in DEFAULTS[kind].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.variant_list = [v for v in args.variants.split(",") if v]
  args.attention_used = resolve_attention(  # checks the choice early
      args.attention, jnp.bfloat16 if args.precision == "bf16" else jnp.float32)
  if args.xl and "XL/2" not in args.variant_list:
    args.variant_list.append("XL/2")
  return args


def repo_relative(path: str) -> str:
  """`path` relative to the repository when it lies inside it: result files are committed."""
  rel = os.path.relpath(os.path.abspath(path), ROOT)
  return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def reexec_with_retained_malloc() -> None:
  """Restarts this script under `RETAIN_MALLOC` (glibc reads its tunables at start-up)."""
  if RETAIN_MALLOC in os.environ.get("GLIBC_TUNABLES", ""):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), RETAIN_MALLOC) if x)
  print(f"re-running under GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", flush=True)
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv: list[str] | None = None) -> dict:
  if "--no-torch" not in (sys.argv[1:] if argv is None else argv):
    # On a GPU the PyTorch worker shares the device: JAX takes half its memory, not 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  args = parse_args(argv)
  if (argv is None and args.malloc == "retain" and jax.devices()[0].platform == "cpu"
      and platform.system() == "Linux"):
    reexec_with_retained_malloc()
  worker = None
  if args.torch:
    jax_platform = jax.devices()[0].platform
    if jax_platform in ("cpu", "gpu"):
      try:
        worker = TorchWorker("cuda" if jax_platform == "gpu" else "cpu")
      except RuntimeError as e:
        print(f"{e}: skipping the reference.")
    else:
      print(f"PyTorch has no {jax_platform} device here: skipping the reference.")
  mesh = benchmark_mesh(args)
  report: dict[str, Any] = dict(
      command="python experiments/benchmark.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      machine=machine_info(worker.info if worker else None), load_average_start=load_average(),
      settings={k: v for k, v in vars(args).items() if k != "variant_list"},
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      torch_device=worker.device if worker else None, variants={})
  report["settings"]["mesh_devices"] = int(mesh.devices.size)
  report["settings"]["out_dir"] = repo_relative(args.out_dir)
  start = time.perf_counter()
  for variant in args.variant_list:
    report["variants"][variant] = benchmark_variant(variant, args, mesh, worker)
  if worker is not None:
    worker.close()
  if args.sampler:
    report["sampler"] = benchmark_sampler(args, mesh)
  if args.xl_compile:
    print("[XL/2] abstract train-step compile ...", flush=True)
    report["xl2_train_step_compile"] = xl_compile(args, mesh)
    print(f"[XL/2] {report['xl2_train_step_compile']}", flush=True)
  else:
    report["xl2_train_step_compile"] = dict(skipped="--no-xl_compile")
  report["load_average_end"] = load_average()
  report["wall_s"] = round(time.perf_counter() - start, 1)
  report["targets"] = targets(report)
  os.makedirs(args.out_dir, exist_ok=True)
  name = f"benchmark_{report['machine']['platform']}"
  with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
    f.write(markdown(report))
  print(markdown(report))
  return report


if __name__ == "__main__":
  if sys.argv[1:2] == ["--torch_worker"]:
    serve_torch(sys.argv[2])
  else:
    main()
