"""The PyTorch side: the reference network (`tests/torch_reference.py`), ready to time.

The same work as the JAX side, so the two can be compared step for step: the same
ADM hybrid loss (`TorchADMLoss`, ported from `diffusion.adm_loss`), `torch.optim.AdamW`
(foreach) and EMA for a train step, eager or under `torch.compile`; a forward in inference
mode; and the official sampling loop (`torch_ddpm_loop`). The benchmark drives it in a
process of its own (`TorchWorker`, which runs this file), so neither framework's
allocations disturb the other's.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

from diffit_jax import models
from diffit_jax.diffusion import respace
from diffit_jax.diffusion.gaussian import get_named_beta_schedule

from bench_common import ROOT, PeakMemory, measure
from bench_model import WEIGHT_STD, model_config

TORCH_REFERENCE = os.path.join(ROOT, "tests", "torch_reference.py")


def import_torch_reference() -> Any:
  """tests/torch_reference.py as a module (it is not part of the package)."""
  spec = importlib.util.spec_from_file_location("diffit_torch_reference", TORCH_REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_model(torch, reference, config: Any, device: str) -> Any:
  """The reference's latent DiffiT for `config` (a `bench_model.model_config`), seed 0."""
  torch.manual_seed(0)
  return reference.LatentDiffiT(input_size=config.input_size, in_channels=config.in_channels,
                                num_classes=config.num_classes, learn_sigma=True,
                                **models.latent_sizes(config)).to(device)


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
  b, c = batch_size, config.in_channels
  tag = "torch_compile" if compile_model else "torch_eager"
  info: dict[str, Any] = {}
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16,
                                    enabled=precision == "bf16")
  model = reference_model(torch, reference, config, device)
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


def torch_ddpm_loop(torch, model, *, steps: int, batch: int, input_size: int, device: str,
                    bf16: bool, compile_model: bool):
  """The official protocol in PyTorch: `run()` draws one batch with `steps` DDPM steps.

  ADM's p_sample with learned-range variance on the respaced linear schedule, the model
  called through the official `forward_with_cfg` (power-cosine, 3 channels, w = 4.4) on a
  [cond; uncond] batch, as NVIDIA's sampling script does.
  """
  schedule = respace.create_schedule("linear", 1000, str(steps))
  betas = np.asarray(schedule.betas, np.float64)
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  tables = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in dict(
      sqrt_recip_ac=np.sqrt(1.0 / ac), sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
      min_log=np.log(np.append(post_var[1], post_var[1:])), max_log=np.log(betas),
      coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)).items()}
  timestep_map = torch.tensor(np.asarray(schedule.timestep_map), device=device)
  guided = model.forward_with_cfg
  if compile_model:
    guided = torch.compile(guided)
  num_classes = model.num_classes
  y = torch.cat([torch.randint(0, num_classes, (batch,), device=device),
                 torch.full((batch,), num_classes, device=device)])
  c = 4

  def run():
    x = torch.randn(batch, c, input_size, input_size, device=device)
    with torch.inference_mode():
      for i in reversed(range(steps)):
        t = timestep_map[i].expand(2 * batch)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
          out = guided(torch.cat([x, x]), t, y, 4.4)
        eps, v = out[:batch, :c].float(), out[:batch, c:].float()
        frac = (v + 1) / 2
        log_var = frac * tables["max_log"][i] + (1 - frac) * tables["min_log"][i]
        x0 = tables["sqrt_recip_ac"][i] * x - tables["sqrt_recipm1_ac"][i] * eps
        mean = tables["coef1"][i] * x0 + tables["coef2"][i] * x
        x = mean + (torch.exp(0.5 * log_var) * torch.randn_like(x) if i > 0 else 0)
    if device == "cuda":
      torch.cuda.synchronize()
    return x

  return run




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
        [sys.executable, os.path.abspath(__file__), device],
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




if __name__ == "__main__":
  serve_torch(sys.argv[1])  # started by `TorchWorker`
